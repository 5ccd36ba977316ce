"""What a Lookup must pass before any work is done for it: the data port's token and its cost.

The cost is read from the request's byte lengths (nothing is parsed) and the version's
table dims: table groups, rows, output vectors (bags) and answer bytes, each bounded by
a flag. Rows alone do not bound the work: an offsets-only group of 2M empty bags has no
rows but a 2M-vector answer, and 100k empty groups cost per-group work each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from embedding_server.auth import AdminAuth
from embedding_server.config import ServerConfig
from embedding_server.errors import ServiceError
from embedding_server.served_table import ServedTable
from protos import embedding_pb2 as pb


def _too_much(asks: str, flag: str, limit: int) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request {asks}, more than this server's {flag}={limit}; split it")


@dataclass(frozen=True)
class Cost:
    """The size of one LookupRequest: rows in, and output vectors per group out."""

    rows: int
    bags: tuple[int, ...]
    """Output vectors of each group, in request order."""


def _bags(g: pb.TableLookup, rows: int) -> int:
    """Output vectors of one group: its bags when pooled with offsets, else one per row."""
    offsets = len(g.offsets) // 8 if g.pooling != pb.POOLING_NONE else 0  # one read: it copies
    return max(offsets - 1, 0) if offsets else rows


def check_cost(req: pb.LookupRequest, cfg: ServerConfig) -> Cost:
    """Refuse (INVALID_ARGUMENT) a request with too many groups, rows or bags."""
    groups = len(req.tables)
    if groups > cfg.max_tables_per_request:  # first: counting the rest walks every group
        raise _too_much(f"carries {groups} table groups", "--max-tables-per-request",
                        cfg.max_tables_per_request)
    rows, bags = 0, []
    for g in req.tables:
        n = len(g.rows) // 8
        rows += n
        bags.append(_bags(g, n))
    if rows > cfg.max_rows_per_request:
        raise _too_much(f"asks for {rows} rows", "--max-rows-per-request", cfg.max_rows_per_request)
    if sum(bags) > cfg.max_bags_per_request:
        raise _too_much(f"asks for {sum(bags)} bags", "--max-bags-per-request", cfg.max_bags_per_request)
    return Cost(rows, tuple(bags))


def answer_bytes(req: pb.LookupRequest, cost: Cost, tables: Mapping[str, ServedTable]) -> int:
    """Bytes of the answer's data: each group's vectors times its output's row width.

    Groups naming an unknown table or output count 0: the lookup refuses them anyway.
    """
    total = 0
    for g, bags in zip(req.tables, cost.bags, strict=True):
        t = tables.get(g.table)
        if t is not None:
            width = {pb.OUTPUT_INT4_PACKED: t.spec.row_bytes, pb.OUTPUT_FP16: 2 * t.spec.dim,
                     pb.OUTPUT_FP32: 4 * t.spec.dim}.get(g.output, 0)
            total += width * bags
    return total


def check_answer(req: pb.LookupRequest, cost: Cost, tables: Mapping[str, ServedTable],
                 cfg: ServerConfig) -> None:
    """Refuse (INVALID_ARGUMENT) a request whose answer would exceed --max-response-bytes."""
    n = answer_bytes(req, cost, tables)
    if n > cfg.max_response_bytes:
        raise _too_much(f"needs an answer of {n} bytes", "--max-response-bytes", cfg.max_response_bytes)


class LookupToken:
    """The optional bearer token of the data port (--lookup-token-file); admin's check, reused."""

    def __init__(self, token: str | None) -> None:
        self._auth = AdminAuth(token) if token else None

    def check(self, context: grpc.ServicerContext) -> None:
        """Raise UNAUTHENTICATED unless no token is configured or the call carries it."""
        if self._auth is None:
            return
        try:
            self._auth.check(context)
        except ServiceError:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "Lookup needs metadata 'authorization: Bearer <token>' with the token "
                               "of this server's --lookup-token-file") from None
