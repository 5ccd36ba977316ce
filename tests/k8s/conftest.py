"""Fixtures of the k8s tests: a real kustomize, and each overlay rendered by it."""

from __future__ import annotations

import os

import pytest

from tests.k8s.manifests import OVERLAYS, Obj, find_kustomize, render


@pytest.fixture(scope="session")
def kustomize() -> tuple[str, ...]:
    """The render command; skips (fails under CI=true) when no kustomize v5+ exists."""
    prefix, why = find_kustomize()
    if prefix is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must render the manifests: {why}")
        pytest.skip(why)
    return prefix


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objs(kustomize: tuple[str, ...], overlay: str) -> list[Obj]:
    return render(overlay)
