"""Every module the services import is installed by `pip install .` (no dev extras).

The image installs the project without its dev extras; httpx was a dev dependency while
the controller, deployctl and the --workers supervisor imported it, so the image could
not run them. This walks every import in the services' code (function-level ones too)
and checks it against the standard library, our own packages and the modules that the
runtime dependencies and their own requirements provide.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("modelpack", "protos", "embedding_server", "ranker_server", "deploy_controller")
FIRST_PARTY = {*SERVICES, "loadtest"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _runtime_closure() -> set[str]:
    """Distribution names of the runtime dependencies and everything they require."""
    todo = [_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _imports(package: str) -> set[str]:
    out: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return out


def test_the_services_import_only_what_a_plain_install_provides() -> None:
    runtime = _runtime_closure()
    provided = {module for module, dists in md.packages_distributions().items()
                if any(_name(d) in runtime for d in dists)}
    missing: dict[str, list[str]] = {}
    for package in SERVICES:
        for module in _imports(package) - set(sys.stdlib_module_names) - FIRST_PARTY:
            if module not in provided:
                missing.setdefault(module, []).append(package)
    assert not missing, f"imported but not a runtime dependency (pyproject.toml): {missing}"
