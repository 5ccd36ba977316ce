from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_SUM: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_INT4_PACKED: _ClassVar[Output]
    OUTPUT_FP16: _ClassVar[Output]
    OUTPUT_FP32: _ClassVar[Output]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
POOLING_NONE: Pooling
POOLING_SUM: Pooling
POOLING_MEAN: Pooling
OUTPUT_INT4_PACKED: Output
OUTPUT_FP16: Output
OUTPUT_FP32: Output
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_UNLOADING: VersionState
VERSION_STATE_FAILED: VersionState

class LookupRequest(_message.Message):
    __slots__ = ("model", "version", "fingerprint", "tables", "id", "timeout_s", "seq")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    fingerprint: str
    tables: _containers.RepeatedCompositeFieldContainer[TableLookup]
    id: int
    timeout_s: float
    seq: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableLookup, _Mapping]]] = ..., id: _Optional[int] = ..., timeout_s: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...

class TableLookup(_message.Message):
    __slots__ = ("table", "rows", "offsets", "pooling", "output")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: bytes
    offsets: bytes
    pooling: Pooling
    output: Output
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., output: _Optional[_Union[Output, str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("model", "version", "fingerprint", "shard", "num_shards", "results", "id", "failure", "seq")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    fingerprint: str
    shard: int
    num_shards: int
    results: _containers.RepeatedCompositeFieldContainer[TableResult]
    id: int
    failure: LookupFailure
    seq: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., results: _Optional[_Iterable[_Union[TableResult, _Mapping]]] = ..., id: _Optional[int] = ..., failure: _Optional[_Union[LookupFailure, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class LookupFailure(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TableResult(_message.Message):
    __slots__ = ("table", "dim", "count", "data")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    count: int
    data: bytes
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., count: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LoadVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnloadVersionRequest(_message.Message):
    __slots__ = ("model", "version", "drain_timeout_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    drain_timeout_s: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("model", "version", "fingerprint", "state", "bytes", "shard", "num_shards", "error", "in_flight", "readable_seqs", "applied_seq", "overlay_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    READABLE_SEQS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    fingerprint: str
    state: VersionState
    bytes: int
    shard: int
    num_shards: int
    error: str
    in_flight: int
    readable_seqs: _containers.RepeatedScalarFieldContainer[int]
    applied_seq: int
    overlay_bytes: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., state: _Optional[_Union[VersionState, str]] = ..., bytes: _Optional[int] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., error: _Optional[str] = ..., in_flight: _Optional[int] = ..., readable_seqs: _Optional[_Iterable[int]] = ..., applied_seq: _Optional[int] = ..., overlay_bytes: _Optional[int] = ...) -> None: ...

class ApplyDeltasRequest(_message.Message):
    __slots__ = ("model", "version", "seq", "fingerprint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    seq: int
    fingerprint: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., seq: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "shard", "num_shards", "memory_budget_bytes", "memory_used_bytes")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    shard: int
    num_shards: int
    memory_budget_bytes: int
    memory_used_bytes: int
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class FitInfo(_message.Message):
    __slots__ = ("fits", "required_bytes", "available_bytes", "reason")
    FITS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    fits: bool
    required_bytes: int
    available_bytes: int
    reason: str
    def __init__(self, fits: _Optional[bool] = ..., required_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
