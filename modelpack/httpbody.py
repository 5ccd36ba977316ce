"""Reading an HTTP API's JSON request body: capped in size, strictly parsed.

Shared by the HTTP APIs that take small JSON bodies (the deploy controller, the ranker's
admin API). Every refusal is a BodyError carrying the HTTP status to answer and a
message naming the problem, so that no body a client sends can reach a handler as bytes
or a non-finite number (the two things FastAPI's defaults turned into 500s):

- `read_capped`: a declared Content-Length past the cap is refused before reading
  anything; a body without one is counted while it streams in (413 either way).
- `json_content_type`: a body sent as something other than JSON (text/plain, form,
  protobuf, octet-stream) is a 415; no content type at all is read as JSON (curl).
- `strict_json`: UTF-8 JSON only (400 otherwise), without NaN/Infinity, floats that
  overflow to infinity (1e400) or integers outside 64 bits.

It imports no web framework: callers hand in the header values and the chunk stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterable
from typing import Any, NoReturn

_INT_BOUND = 2**63  # integers must fit int64: every numeric field here does


class BodyError(ValueError):
    """A request body refused with HTTP `status`; `message` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_capped(content_length: str | None, chunks: AsyncIterable[bytes],
                      limit: int) -> bytes:
    """The whole body, at most `limit` bytes; BodyError 413 as soon as it is known to be more."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BodyError(413, f"body: {content_length} bytes, at most {limit} accepted")
    buf = bytearray()
    async for chunk in chunks:
        if len(buf) + len(chunk) > limit:
            raise BodyError(413, f"body: more than {limit} bytes, at most {limit} accepted")
        buf += chunk
    return bytes(buf)


def json_content_type(content_type: str | None) -> None:
    """BodyError 415 unless the content type is absent, application/json or */*+json."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise BodyError(415, f"content-type {media}: the body must be JSON "
                        "(content-type: application/json)")


def strict_json(body: bytes) -> Any:
    """`body` parsed as UTF-8 JSON with finite, 64-bit-sized numbers; BodyError 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(400, f"body: not UTF-8 (byte 0x{body[e.start]:02x} at offset "
                        f"{e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_int64)
    except json.JSONDecodeError as e:
        raise BodyError(400, f"body: not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError(400, "body: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        if isinstance(e, BodyError):
            raise
        raise BodyError(400, f"body: not valid JSON: {e}") from None


def _no_constant(name: str) -> NoReturn:
    raise BodyError(400, f"body: {name} is not a JSON number (numbers must be finite)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise BodyError(400, f"body: number {_short(literal)} does not fit a 64-bit float")
    return value


def _int64(literal: str) -> int:
    value = int(literal)
    if not -_INT_BOUND <= value < _INT_BOUND:
        raise BodyError(400, f"body: integer {_short(literal)} does not fit in 64 bits")
    return value


def _short(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...({len(literal)} digits)"
