from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Feature(_message.Message):
    __slots__ = ("name", "ids", "lengths", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ids: bytes
    lengths: bytes
    values: bytes
    def __init__(self, name: _Optional[str] = ..., ids: _Optional[bytes] = ..., lengths: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "model", "timeout_ms", "user", "candidates", "num_candidates")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    timeout_ms: int
    user: _containers.RepeatedCompositeFieldContainer[Feature]
    candidates: _containers.RepeatedCompositeFieldContainer[Feature]
    num_candidates: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., user: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., num_candidates: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "scores", "seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: str
    scores: bytes
    seq: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., scores: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...
