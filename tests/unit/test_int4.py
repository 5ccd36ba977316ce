"""INT4 codec: round trip, and byte parity with FBGEMM's quantizer and TBE lookup."""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)

from modelpack.int4 import dequantize_rows, quantize_rows, row_bytes, to_fbgemm_layout

SHAPES = [(1, 8), (7, 8), (33, 16), (101, 64), (5, 256), (3, 12), (257, 32)]


def _matrix(rows: int, dim: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    if kind == "constant":
        # Every row constant and fp16-exact: range 0, FBGEMM's scale-0 corner case.
        x[:] = rng.standard_normal((rows, 1)).astype(np.float16).astype(np.float32)
    elif kind == "huge":
        x = np.clip(x * 2e4, -6.5e4, 6.5e4)
        x[0, 0], x[0, -1] = 6.5e4, -6.5e4  # range 1.3e5: near fp16's limits
    elif kind == "tiny":
        x *= 1e-6
    elif kind == "mixed":
        x[::2] = 3.0
        x[1::3] *= 1e4
    return x


KINDS = ["normal", "constant", "huge", "tiny", "mixed"]


@pytest.mark.parametrize(("rows", "dim"), SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_match_fbgemm_quantizer(rows: int, dim: int, kind: str) -> None:
    x = _matrix(rows, dim, kind, seed=rows * dim)
    ours = quantize_rows(x)
    assert ours.shape == (rows, row_bytes(dim))
    ref = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), 4).numpy()
    np.testing.assert_array_equal(to_fbgemm_layout(ours), ref)


@pytest.mark.parametrize(("rows", "dim"), SHAPES)
def test_fp16_input_matches_fbgemm(rows: int, dim: int) -> None:
    x = _matrix(rows, dim, "normal", seed=3).astype(np.float16)
    ref = torch.ops.fbgemm.HalfToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), 4).numpy()
    np.testing.assert_array_equal(to_fbgemm_layout(quantize_rows(x)), ref)


@pytest.mark.parametrize(("rows", "dim"), SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_error_within_half_step(rows: int, dim: int, kind: str) -> None:
    x = _matrix(rows, dim, kind, seed=7)
    packed = quantize_rows(x)
    y = dequantize_rows(packed, dim)
    scale = packed[:, 0:2].copy().view(np.float16).astype(np.float32)
    # Half a quantization step, plus the fp16 rounding of scale and bias.
    # Half a quantization step, plus the fp16 rounding of scale and bias (incl. subnormals).
    tol = (0.5 * scale + 16 * scale * 2.0**-11
           + np.abs(x).max(axis=1, keepdims=True) * 2.0**-11 + 16 * 2.0**-24)
    assert np.all(np.abs(y - x) <= tol)
    if kind == "constant":
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(("rows", "dim"), [(7, 8), (101, 64), (33, 256)])
@pytest.mark.parametrize("pooling", [PoolingMode.SUM, PoolingMode.MEAN])
def test_fbgemm_tbe_reads_our_bytes(rows: int, dim: int, pooling: PoolingMode) -> None:
    x = _matrix(rows, dim, "normal", seed=11)
    packed = quantize_rows(x)
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("t", rows, dim, SparseType.INT4, EmbeddingLocation.HOST)],
        device="cpu", pooling_mode=pooling, output_dtype=SparseType.FP32,
    )
    tbe.fill_random_weights()
    # Whole rows, qparams first: exactly the bytes our files hold.
    (dest, _), = tbe.split_embedding_weights(split_scale_shifts=False)
    dest.copy_(torch.from_numpy(packed))
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, size=9)
    idx = rng.integers(0, rows, size=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = tbe(torch.from_numpy(idx).int(), torch.from_numpy(offsets).int()).numpy()
    ref_rows = dequantize_rows(packed, dim)
    for b in range(lengths.size):
        bag = ref_rows[idx[offsets[b]:offsets[b + 1]]]
        want = bag.sum(axis=0) if bag.size else np.zeros(dim, np.float32)
        if pooling == PoolingMode.MEAN and bag.shape[0]:
            want = want / bag.shape[0]
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)


def test_odd_dim_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="even"):
        quantize_rows(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="divisible by 4"):
        quantize_rows(np.zeros((2, 6), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_table_and_row(bad: float) -> None:
    x = np.zeros((5, 8), np.float32)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"table 'ads': row 103 holds NaN or Inf"):
        quantize_rows(x, name="table 'ads'", row_offset=100)


def test_value_beyond_fp16_is_refused() -> None:
    x = np.zeros((2, 8), np.float32)
    x[1, 0] = 1e6
    with pytest.raises(ValueError, match=r"row 1 .*fp16"):
        quantize_rows(x)


def test_wrong_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="float32 or float16"):
        quantize_rows(np.zeros((2, 8), np.int32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(R, 8\)"):
        dequantize_rows(np.zeros((2, 9), np.uint8), 8)
