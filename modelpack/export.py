"""Export a trained PyTorch model (embedding tables + dense module) to a model version.

Accepts `nn.EmbeddingBag` / `nn.Embedding` modules or plain weight tensors per table,
and TorchRec `EmbeddingBagCollection` state dicts (keys `embedding_bags.<table>.weight`).
Weights are read in row blocks and quantized block by block, so a memory-mapped or
otherwise lazily backed 450M-row weight never has to be materialized as a float copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from modelpack.manifest import Manifest
from modelpack.schema import DenseSpec, FeatureSchema, TableSpec
from modelpack.writer import VersionWriter

BLOCK_ROWS = 1 << 18
TableSource = nn.Embedding | nn.EmbeddingBag | torch.Tensor | npt.NDArray[np.floating]
_TORCHREC_PREFIX = "embedding_bags."
_TORCHREC_SUFFIX = ".weight"


def _weight(src: TableSource) -> torch.Tensor | npt.NDArray[np.floating]:
    if isinstance(src, nn.Embedding | nn.EmbeddingBag):
        return src.weight.detach()
    return src


def iter_blocks(weight: torch.Tensor | npt.NDArray[np.floating], block_rows: int = BLOCK_ROWS
                ) -> Iterator[npt.NDArray[np.float32]]:
    """Yield float32 row blocks of a 2-D weight (torch or numpy), one block in memory at a time."""
    for start in range(0, weight.shape[0], block_rows):
        b = weight[start:start + block_rows]
        if isinstance(b, torch.Tensor):
            b = b.detach().to(torch.float32).cpu().numpy()
        yield np.asarray(b, dtype=np.float32)


def tables_from_torchrec_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick `embedding_bags.<table>.weight` tensors out of an EmbeddingBagCollection state dict."""
    out = {}
    for key, t in state.items():
        if key.startswith(_TORCHREC_PREFIX) and key.endswith(_TORCHREC_SUFFIX):
            out[key[len(_TORCHREC_PREFIX):-len(_TORCHREC_SUFFIX)]] = t
    if not out:
        raise ValueError(
            "state dict has no 'embedding_bags.<table>.weight' keys; is it a TorchRec "
            f"EmbeddingBagCollection? keys: {sorted(state)[:5]}"
        )
    return out


def export_version(store: Path | str, model: str, version: str, *, schema: FeatureSchema,
                   tables: Mapping[str, TableSource], num_shards: int | Mapping[str, int],
                   dense: nn.Module, architecture: str, config: dict[str, Any],
                   extra_files: Mapping[str, bytes] | None = None,
                   provenance: dict[str, Any] | None = None, progress: bool = True,
                   overwrite: bool = False) -> Manifest:
    """Quantize, shard, write and fingerprint one version; returns its manifest."""
    specs = []
    for name, src in tables.items():
        weight = _weight(src)
        if len(weight.shape) != 2:
            raise ValueError(
                f"table {name!r}: weight must be 2-D (rows, dim), got {tuple(weight.shape)}"
            )
        shards = num_shards if isinstance(num_shards, int) else num_shards.get(name, 1)
        specs.append(TableSpec(name=name, rows=int(weight.shape[0]), dim=int(weight.shape[1]),
                               num_shards=shards))
    used = {f.table for f in schema.sparse}
    missing = used - set(tables)
    if missing:
        raise ValueError(f"features use tables {sorted(missing)} that were not given")
    spec = DenseSpec(architecture=architecture, config=dict(config))
    with VersionWriter(store, model, version, schema, specs, spec, provenance=provenance,
                       progress=progress, overwrite=overwrite) as writer:
        for name, src in tables.items():
            writer.write_table_blocks(name, iter_blocks(_weight(src)))
        writer.write_dense(dense)
        for rel, data in (extra_files or {}).items():
            writer.add_file(rel, data)
    assert writer.manifest is not None
    return writer.manifest
