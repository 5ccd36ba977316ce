"""Registry of dense upper-model architectures, and their safetensors weight files.

A model store is not trusted code, so a version names its dense model by architecture
and config (resolved here) and ships only tensors: weights are read with safetensors,
never with pickle or `torch.load`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Builder = Callable[[Mapping[str, object]], nn.Module]

# The one module-level mutable: filled at import time by @register_architecture.
_REGISTRY: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Register `builder(config) -> nn.Module` under `name`; the builder validates config."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"dense architecture {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def known_architectures() -> list[str]:
    return sorted(_REGISTRY)


def build_dense(architecture: str, config: Mapping[str, object]) -> nn.Module:
    """Build a freshly initialised dense model; ValueError on unknown names or bad config."""
    builder = _REGISTRY.get(architecture)
    if builder is None:
        raise ValueError(
            f"unknown dense architecture {architecture!r}; "
            f"known: {', '.join(known_architectures())}"
        )
    return builder(config)


def save_dense(module: nn.Module, path: Path) -> None:
    """Write the module's weights to `path` as safetensors, atomically (temp file + rename)."""
    path = Path(path)
    # Shared or strided storage is not allowed by safetensors: write detached contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_dense(path: Path, architecture: str, config: Mapping[str, object]) -> nn.Module:
    """Build `architecture` from `config` and load `path` into it, checking every key and shape.

    Raises ValueError naming the first missing key, unexpected key, shape or dtype mismatch,
    or an unreadable file. Returns the module on the CPU in eval mode.
    """
    module = build_dense(architecture, config)
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing weight {missing[0]!r} for architecture {architecture!r}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected weight {unexpected[0]!r} for {architecture!r}")
    for key in sorted(expected):
        want, got = expected[key], tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{path}: weight {key!r} has shape {tuple(got.shape)}, "
                f"architecture {architecture!r} with this config needs {tuple(want.shape)}"
            )
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(f"{path}: weight {key!r} has dtype {got.dtype}, expected {want.dtype}")
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def _int(config: Mapping[str, object], key: str, minimum: int) -> int:
    value = config[key]
    # bool is an int subclass; `cross_layers: true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"dense config {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _int_list(config: Mapping[str, object], key: str) -> list[int]:
    value = config[key]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"dense config {key!r} must be a list of integers >= 1, got {value!r}")
    return [int(v) for v in value]


def _check_keys(architecture: str, config: Mapping[str, object], keys: set[str]) -> None:
    missing = sorted(keys - set(config))
    if missing:
        raise ValueError(f"{architecture} config is missing key {missing[0]!r}")
    unknown = sorted(set(config) - keys)
    if unknown:
        raise ValueError(
            f"{architecture} config has unknown key {unknown[0]!r}; expected {sorted(keys)}"
        )


class LowRankCross(nn.Module):
    """One DCN-v2 cross layer with a rank-r weight: x_{l+1} = x0 * (U (V^T x_l) + b) + x_l."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.v = nn.Linear(width, rank, bias=False)
        self.u = nn.Linear(rank, width, bias=True)

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        out: Tensor = x0 * self.u(self.v(xl)) + xl
        return out


class DCNv2(nn.Module):
    """DCN-v2, parallel form (Wang et al. 2021): cross stack beside an MLP, then one logit."""

    def __init__(
        self,
        num_sparse: int,
        embedding_dim: int,
        num_dense: int,
        cross_layers: int,
        cross_rank: int,
        mlp_dims: list[int],
    ) -> None:
        super().__init__()
        self.num_sparse, self.embedding_dim, self.num_dense = num_sparse, embedding_dim, num_dense
        width = num_sparse * embedding_dim + num_dense
        self.cross = nn.ModuleList(LowRankCross(width, cross_rank) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        prev = width
        for d in mlp_dims:
            layers += [nn.Linear(prev, d), nn.ReLU()]
            prev = d
        self.mlp = nn.Sequential(*layers)
        # With no MLP layers the "deep" branch is the identity; keep the head width honest.
        self.head = nn.Linear(width + (prev if mlp_dims else 0), 1)
        self.has_mlp = bool(mlp_dims)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """sparse: (B, F, D) float32 pooled embeddings; dense: (B, Fd) float32 -> (B,) logits."""
        if sparse.dim() != 3 or sparse.shape[1:] != (self.num_sparse, self.embedding_dim):
            raise ValueError(
                f"sparse input must be (B, {self.num_sparse}, {self.embedding_dim}), "
                f"got {tuple(sparse.shape)}"
            )
        if dense.dim() != 2 or dense.shape != (sparse.shape[0], self.num_dense):
            raise ValueError(
                f"dense input must be ({sparse.shape[0]}, {self.num_dense}), "
                f"got {tuple(dense.shape)}"
            )
        x0 = torch.cat([sparse.flatten(1), dense], dim=1)
        xl = x0
        for layer in self.cross:
            xl = layer(x0, xl)
        parts = [xl, self.mlp(x0)] if self.has_mlp else [xl]
        logits: Tensor = self.head(torch.cat(parts, dim=1)).squeeze(1)
        return logits


@register_architecture("dcn_v2")
def _build_dcn_v2(config: Mapping[str, object]) -> nn.Module:
    keys = {"num_sparse", "embedding_dim", "num_dense", "cross_layers", "cross_rank", "mlp_dims"}
    _check_keys("dcn_v2", config, keys)
    return DCNv2(
        num_sparse=_int(config, "num_sparse", 1),
        embedding_dim=_int(config, "embedding_dim", 1),
        num_dense=_int(config, "num_dense", 0),
        cross_layers=_int(config, "cross_layers", 0),
        cross_rank=_int(config, "cross_rank", 1),
        mlp_dims=_int_list(config, "mlp_dims"),
    )
