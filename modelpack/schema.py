"""The feature schema and table specs of a model version, as typed dataclasses.

These are the in-memory form of the manifest's `features` and `tables` sections; the
manifest module turns them into JSON and back and validates them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

Side = Literal["user", "candidate"]
Pooling = Literal["sum", "mean"]
Normalization = Literal["none", "standard", "log1p_standard"]

# Names that end up in paths or URLs: a conservative charset, no separators, no dots first.
# Always fullmatch: `$` would also match before a trailing newline ("v1\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_SHOWN = 40  # characters of a refused name echoed back: error messages travel in gRPC metadata


class SchemaError(ValueError):
    """A manifest or schema that does not describe a valid model version."""


def check_name(kind: str, name: object) -> str:
    """Return `name` if it is a safe identifier (no path separators, no `..`), else raise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        text = repr(name)
        shown = text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text) - _SHOWN} more characters)"
        raise SchemaError(
            f"invalid {kind} name {shown}: use letters, digits, '_', '-', '.', "
            "start with a letter or digit, no '..', at most 128 characters"
        )
    return name


@dataclass(frozen=True)
class SparseFeature:
    """An ID feature looked up in an embedding table."""

    name: str
    side: Side
    table: str
    hash_seed: int
    multi_valued: bool = False
    max_length: int = 1
    pooling: Pooling = "sum"


@dataclass(frozen=True)
class DenseFeature:
    """A float feature fed straight to the dense model after normalization."""

    name: str
    side: Side
    normalization: Normalization = "none"
    mean: float = 0.0
    std: float = 1.0

    def normalize_array(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The model's input for raw values `x`: the one normalization, offline and served.

        The arithmetic runs in float64 and is rounded to float32 once; a value that
        normalization carries past float32's range comes out as inf, for the caller to
        refuse naming its field.
        """
        v = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.normalization == "log1p_standard":
                v = np.log1p(np.maximum(v, 0.0))
            if self.normalization != "none":
                v = (v - self.mean) / self.std
            return v.astype(np.float32)


@dataclass(frozen=True)
class FeatureSchema:
    """All features of a model, in the order the dense model consumes them."""

    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...] = ()

    def sparse_by_side(self, side: Side) -> list[SparseFeature]:
        return [f for f in self.sparse if f.side == side]

    def dense_by_side(self, side: Side) -> list[DenseFeature]:
        return [f for f in self.dense if f.side == side]


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: `rows` x `dim`, stored INT4 row-wise in `num_shards` files."""

    name: str
    rows: int
    dim: int
    num_shards: int = 1
    dtype: Literal["int4"] = "int4"

    @property
    def row_bytes(self) -> int:
        """Bytes per stored row: fp16 scale + fp16 bias + dim/2 nibble bytes."""
        return 4 + self.dim // 2

    def shard_path(self, shard: int) -> str:
        """Path of shard `shard`'s file, relative to the version directory."""
        return f"tables/{self.name}/shard-{shard}-of-{self.num_shards}.bin"


@dataclass(frozen=True)
class DenseSpec:
    """The dense upper model: an architecture from the registry, its config and weights."""

    architecture: str
    config: dict[str, object] = field(default_factory=dict)
    path: str = "dense.safetensors"


def validate_schema(schema: FeatureSchema, tables: list[TableSpec]) -> None:
    """Raise SchemaError naming the first inconsistency between features and tables."""
    names: set[str] = set()
    table_names = {t.name for t in tables}
    if len(table_names) != len(tables):
        raise SchemaError("duplicate table names in manifest")
    for t in tables:
        check_name("table", t.name)
        if t.rows <= 0:
            raise SchemaError(f"table {t.name!r}: rows must be > 0, got {t.rows}")
        if t.dim <= 0 or t.dim % 2:
            raise SchemaError(
                f"table {t.name!r}: dim must be a positive even number for INT4 "
                f"(two values per byte), got {t.dim}"
            )
        if t.dim % 4:
            raise SchemaError(
                f"table {t.name!r}: FBGEMM's INT4 kernels need dim divisible by 4, got {t.dim}"
            )
        if not 1 <= t.num_shards <= t.rows:
            raise SchemaError(f"table {t.name!r}: num_shards must be in [1, rows], got {t.num_shards}")
        if t.dtype != "int4":
            raise SchemaError(f"table {t.name!r}: only dtype 'int4' is supported, got {t.dtype!r}")
    if not schema.sparse:
        raise SchemaError("feature schema has no sparse features")
    features: list[SparseFeature | DenseFeature] = [*schema.sparse, *schema.dense]
    for f in features:
        check_name("feature", f.name)
        if f.name in names:
            raise SchemaError(f"duplicate feature name {f.name!r}")
        names.add(f.name)
        if f.side not in ("user", "candidate"):
            raise SchemaError(f"feature {f.name!r}: side must be 'user' or 'candidate', got {f.side!r}")
    for sf in schema.sparse:
        if sf.table not in table_names:
            raise SchemaError(f"feature {sf.name!r} refers to unknown table {sf.table!r}")
        if sf.pooling not in ("sum", "mean"):
            raise SchemaError(f"feature {sf.name!r}: pooling must be 'sum' or 'mean', got {sf.pooling!r}")
        if sf.max_length < 1 or (not sf.multi_valued and sf.max_length != 1):
            raise SchemaError(
                f"feature {sf.name!r}: max_length must be 1 for single-valued and >= 1 "
                f"for multi-valued features, got {sf.max_length}"
            )
    for df in schema.dense:
        if df.normalization not in ("none", "standard", "log1p_standard"):
            raise SchemaError(f"feature {df.name!r}: unknown normalization {df.normalization!r}")
        if not df.std > 0:
            raise SchemaError(f"feature {df.name!r}: std must be > 0, got {df.std}")
    dims = {t.dim for t in tables if t.name in {sf.table for sf in schema.sparse}}
    if len(dims) > 1:
        raise SchemaError(f"all tables used by sparse features must share one dim, got {sorted(dims)}")
