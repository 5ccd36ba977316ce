"""FBGEMM's CPU IntN TBE kernel over a memory-mapped INT4 table, without copying it.

This is the one module that touches FBGEMM's private details (fbgemm-gpu-cpu 1.8.0):

- `IntNBitTableBatchedEmbeddingBagsCodegen` normally allocates `weights_host` and fills
  it (initialize_weights / assign_embedding_weights). We build it with one HOST table,
  row_alignment=1 and no cacheline padding, then point `weights_host` at the mapped
  uint8 tensor and mark the weights initialized, so the kernel reads the file's pages.
- We call the registered op `fbgemm::int_nbit_split_embedding_codegen_lookup_function`
  with the module's buffers instead of `forward()`: forward costs ~50 µs of Python per
  call (eeg reporting, bounds-check op) and fixes pooling and output dtype per module,
  whereas one op call can pick both per request.

tests/unit/test_embedding_fbgemm_tbe.py pins all of this and fails loudly on an FBGEMM
release that changes it.
"""

from __future__ import annotations

from typing import Literal

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)

Pooling = Literal["sum", "mean"]
Output = Literal["fp16", "fp32"]

_POOLING = {"sum": int(PoolingMode.SUM.value), "mean": int(PoolingMode.MEAN.value)}
_OUTPUT = {"fp16": SparseType.FP16.as_int(), "fp32": SparseType.FP32.as_int()}
QPARAM_BYTES = 4  # fp16 scale + fp16 bias at the start of each row (reverse_qparam=False)


def build_tbe(name: str, rows: int, dim: int, weights: torch.Tensor
              ) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """A one-table CPU TBE whose host weights ARE `weights` (uint8 (rows, 4 + dim/2))."""
    row_bytes = QPARAM_BYTES + dim // 2
    if weights.dtype != torch.uint8 or tuple(weights.shape) != (rows, row_bytes):
        raise ValueError(
            f"table {name!r}: weights must be uint8 ({rows}, {row_bytes}), "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    if not weights.is_contiguous():
        raise ValueError(f"table {name!r}: weights must be contiguous (one mapped byte range)")
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(name, rows, dim, SparseType.INT4, EmbeddingLocation.HOST)],
        pooling_mode=PoolingMode.SUM,
        device="cpu",
        # The caller range-checks every row against the shard first.
        bounds_check_mode=BoundsCheckMode.NONE,
        output_dtype=SparseType.FP16,
        row_alignment=1,
        cacheline_alignment=False,
    )
    if tbe.host_size != rows * row_bytes or list(tbe.weights_physical_offsets) != [0]:
        raise RuntimeError(
            f"FBGEMM lays out table {name!r} as {tbe.host_size} host bytes at offsets "
            f"{tbe.weights_physical_offsets}, expected {rows * row_bytes} at [0]: "
            "the mapped file cannot be used as-is"
        )
    # Instead of _apply_split (which allocates host_size zeros), adopt the mapped bytes.
    tbe.weights_host = weights.view(-1)
    tbe.weight_initialized = True
    tbe.initialize_logical_weights_placements_and_offsets()
    return tbe


class Int4Kernel:
    """Dequantizing (and pooling) lookups of one mapped INT4 table through FBGEMM."""

    def __init__(self, name: str, rows: int, dim: int, weights: torch.Tensor) -> None:
        self.name, self.rows, self.dim = name, rows, dim
        self.tbe = build_tbe(name, rows, dim, weights)
        t = self.tbe
        # Read once: attribute lookups on an nn.Module go through __getattr__ and cost µs.
        self._args = dict(
            dev_weights=t.weights_host, uvm_weights=t.weights_uvm,
            weights_placements=t.weights_placements, weights_offsets=t.weights_offsets,
            weights_tys=t.weights_tys, D_offsets=t.D_offsets, total_D=t.total_D,
            max_int2_D=t.max_int2_D, max_int4_D=t.max_int4_D, max_int8_D=t.max_int8_D,
            max_float16_D=t.max_float16_D, max_float32_D=t.max_float32_D,
            indice_weights=None, lxu_cache_weights=t.lxu_cache_weights,
            lxu_cache_locations=None, row_alignment=t.row_alignment,
            max_float8_D=t.max_float8_D, fp8_exponent_bits=t.fp8_exponent_bits,
            fp8_exponent_bias=t.fp8_exponent_bias,
        )

    @property
    def weights(self) -> torch.Tensor:
        """The 1-D uint8 tensor the kernel reads (the mapped file bytes)."""
        w: torch.Tensor = self.tbe.weights_host
        return w

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor, pooling: Pooling,
               output: Output) -> torch.Tensor:
        """Pool rows `indices` (int64, local to the table) into bags given by `offsets`.

        offsets: int64 (B + 1,), offsets[0] = 0, offsets[-1] = len(indices); an empty bag
        gives a zero row. Returns (B, dim) float16 or float32. No bounds checks here.
        """
        out: torch.Tensor = torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
            indices=indices, offsets=offsets, pooling_mode=_POOLING[pooling],
            output_dtype=_OUTPUT[output], **self._args,
        )
        return out
