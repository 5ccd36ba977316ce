"""Admin fan-out between --workers siblings, so all processes behind one port agree.

With SO_REUSEPORT the kernel hands each connection to one worker, so an admin call
reaches one process only. That worker forwards it (marked with PEER_HEADER, same
token) to every sibling's private loopback port and answers only when all have done
it; ListVersions merges the workers' views so READY means READY in every process.
Each worker announces its private port as a file in the supervisor's peer directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from embedding_server.auth import PEER_HEADER
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

_STATE_RANK = {pb.VERSION_STATE_FAILED: 0, pb.VERSION_STATE_UNSPECIFIED: 1,
               pb.VERSION_STATE_LOADING: 2, pb.VERSION_STATE_UNLOADING: 3, pb.VERSION_STATE_READY: 4}


class Peers:
    """This worker's view of its siblings' private ports."""

    def __init__(self, peer_dir: Path) -> None:
        self.dir = peer_dir
        self.own_address = ""
        self._stubs: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer")

    def register(self, private_port: int) -> None:
        """Announce this worker (called once it is SERVING)."""
        self.own_address = f"127.0.0.1:{private_port}"
        tmp = self.dir / f".worker-{os.getpid()}.tmp"
        tmp.write_text(self.own_address)
        os.replace(tmp, self.dir / f"worker-{os.getpid()}.addr")

    def addresses(self) -> list[str]:
        """Every registered sibling's address except this worker's own."""
        out = []
        for p in sorted(self.dir.glob("worker-*.addr")):
            addr = p.read_text().strip()
            if addr and addr != self.own_address:
                out.append(addr)
        return out

    def _stub(self, addr: str) -> Any:
        if addr not in self._stubs:
            channel = grpc.insecure_channel(addr)
            self._stubs[addr] = pbg.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]
        return self._stubs[addr]

    def call_all(self, method: str, request: Any, authorization: str | None,
                 timeout: float | None) -> list[tuple[str, Any]]:
        """Call `method` on every sibling at once; [(address, response or grpc.RpcError)]."""
        md: list[tuple[str, str]] = [(PEER_HEADER, "1")]
        if authorization is not None:
            md.append(("authorization", authorization))

        def one(addr: str) -> tuple[str, Any]:
            try:
                return addr, getattr(self._stub(addr), method)(request, metadata=md, timeout=timeout)
            except grpc.RpcError as e:
                return addr, e

        return list(self._pool.map(one, self.addresses()))


def merge_version_lists(own: Sequence[pb.VersionInfo], others: Sequence[Sequence[pb.VersionInfo]]
                        ) -> list[pb.VersionInfo]:
    """One list over all workers: a version's state is its least-ready state anywhere."""
    lists = [own, *others]
    keys = sorted({(v.model, v.version) for lst in lists for v in lst})
    merged = []
    for key in keys:
        infos = [next((v for v in lst if (v.model, v.version) == key), None) for lst in lists]
        present = [v for v in infos if v is not None]
        worst = min(present, key=lambda v: _STATE_RANK.get(v.state, 0))
        out = pb.VersionInfo()
        out.CopyFrom(worst)
        out.in_flight = sum(v.in_flight for v in present)
        # A seq is readable where every worker can read it; overlays are per process.
        readable = set(present[0].readable_seqs).intersection(*(v.readable_seqs for v in present))
        out.readable_seqs[:] = sorted(readable)
        out.applied_seq = min(v.applied_seq for v in present)
        out.overlay_bytes = sum(v.overlay_bytes for v in present)
        if len(present) < len(infos) and out.state == pb.VERSION_STATE_READY:
            out.state = pb.VERSION_STATE_LOADING  # not yet (or no longer) everywhere
        merged.append(out)
    return merged
