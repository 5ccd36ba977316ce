"""embedding_server.fbgemm_tbe: FBGEMM's private details we rely on, and its numbers.

If one of these fails after an FBGEMM upgrade, the zero-copy kernel wrapper must be
revisited before the embedding server can run on that release.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_server.fbgemm_tbe import Int4Kernel, build_tbe
from modelpack.int4 import dequantize_rows, quantize_rows

ROWS, DIM = 300, 32


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, torch.Tensor]:
    """Packed rows on disk and a read-only file-backed uint8 tensor over them."""
    rng = np.random.default_rng(0)
    packed = quantize_rows((rng.standard_normal((ROWS, DIM)) * 3).astype(np.float32))
    path = Path(tmp_path_factory.mktemp("tbe")) / "t.bin"
    packed.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").reshape(ROWS, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only on purpose: the server maps PROT_READ
        return packed, torch.from_numpy(mapped)


def test_private_fbgemm_details_still_exist() -> None:
    import fbgemm_gpu.split_table_batched_embeddings_ops_inference as inf

    cls = inf.IntNBitTableBatchedEmbeddingBagsCodegen
    params = inspect.signature(cls.__init__).parameters
    for name in ("embedding_specs", "pooling_mode", "device", "bounds_check_mode", "output_dtype",
                 "row_alignment", "cacheline_alignment"):
        assert name in params, f"IntNBitTableBatchedEmbeddingBagsCodegen lost argument {name!r}"
    assert callable(cls.initialize_logical_weights_placements_and_offsets)
    schema = str(torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function.default._schema)
    for arg in ("dev_weights", "uvm_weights", "weights_placements", "weights_offsets", "weights_tys",
                "D_offsets", "total_D", "max_int4_D", "indices", "offsets", "pooling_mode",
                "indice_weights", "output_dtype", "lxu_cache_weights", "lxu_cache_locations",
                "row_alignment", "max_float8_D", "fp8_exponent_bits", "fp8_exponent_bias"):
        assert f" {arg}" in schema, f"fbgemm lookup op lost argument {arg!r}: {schema}"


def test_weights_are_the_mapped_bytes_not_a_copy(table: tuple[np.ndarray, torch.Tensor]) -> None:
    _, mapped = table
    tbe = build_tbe("t", ROWS, DIM, mapped)
    assert tbe.weights_host.data_ptr() == mapped.data_ptr()
    assert tbe.weights_host.numel() == mapped.numel()
    assert tbe.weight_initialized and tbe.host_size == mapped.numel()
    assert tbe.weights_offsets.tolist() == [0]
    assert Int4Kernel("t", ROWS, DIM, mapped).weights.data_ptr() == mapped.data_ptr()


def test_rejects_wrong_shapes(table: tuple[np.ndarray, torch.Tensor]) -> None:
    _, mapped = table
    with pytest.raises(ValueError, match=r"must be uint8 \(301, 20\)"):
        build_tbe("t", ROWS + 1, DIM, mapped)
    with pytest.raises(ValueError, match="contiguous"):
        build_tbe("t", ROWS, DIM, mapped.t().contiguous().t())


@pytest.mark.parametrize("output", ["fp16", "fp32"])
@pytest.mark.parametrize("pooling", ["none", "sum", "mean"])
def test_matches_numpy_dequantization(table: tuple[np.ndarray, torch.Tensor], pooling: str,
                                      output: str) -> None:
    packed, mapped = table
    kernel = Int4Kernel("t", ROWS, DIM, mapped)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, ROWS, 500)
    if pooling == "none":
        offsets = np.arange(rows.size + 1)
    else:
        lengths = rng.integers(0, 9, 80)
        lengths[[0, 7, 79]] = 0  # empty bags, first and last included
        rows = rows[: lengths.sum()]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    got = kernel.lookup(torch.from_numpy(rows), torch.from_numpy(offsets),
                        "mean" if pooling == "mean" else "sum", output)  # type: ignore[arg-type]
    assert got.dtype == (torch.float16 if output == "fp16" else torch.float32)
    assert tuple(got.shape) == (offsets.size - 1, DIM)
    vals = dequantize_rows(packed[rows], DIM).astype(np.float64)
    want = np.stack([vals[a:b].sum(0) if b > a else np.zeros(DIM)
                     for a, b in itertools.pairwise(offsets)])
    if pooling == "mean":
        want /= np.maximum(np.diff(offsets), 1)[:, None]
    # FBGEMM accumulates in fp32 and rounds once to the output type.
    tol = np.abs(want) * (2.0**-10 if output == "fp16" else 1e-6) + 1e-5
    assert np.all(np.abs(got.double().numpy() - want) <= tol)
    if pooling != "none":
        empty = np.flatnonzero(np.diff(offsets) == 0)
        assert not got[torch.from_numpy(empty)].any()


def test_direct_op_equals_public_forward(table: tuple[np.ndarray, torch.Tensor]) -> None:
    _, mapped = table
    kernel = Int4Kernel("t", ROWS, DIM, mapped)
    rows = torch.randint(0, ROWS, (64,))
    offsets = torch.tensor([0, 10, 10, 40, 64])
    # build_tbe makes a SUM / FP16 module: its forward() is FBGEMM's own public path.
    assert torch.equal(kernel.lookup(rows, offsets, "sum", "fp16"), kernel.tbe(rows, offsets))


def test_empty_lookup(table: tuple[np.ndarray, torch.Tensor]) -> None:
    _, mapped = table
    kernel = Int4Kernel("t", ROWS, DIM, mapped)
    out = kernel.lookup(torch.zeros(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), "mean", "fp32")
    assert tuple(out.shape) == (2, DIM) and not out.any()
    out = kernel.lookup(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), "sum", "fp16")
    assert tuple(out.shape) == (0, DIM)
