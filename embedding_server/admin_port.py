"""--admin-port: a second grpc.Server in the process serving only the admin RPCs.

It shares the data server's EmbeddingServicer (one registry, one set of metrics), and
serves LoadVersion/UnloadVersion/ApplyDeltas/ListVersions/CheckFit but not Lookup; the data server
then refuses the admin RPCs, so a NetworkPolicy on this port isolates exactly admin.
With --workers every worker listens on the admin port (SO_REUSEPORT), and the private
port its siblings fan admin calls out to is on this server, not the data one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from embedding_server.servicer import EmbeddingServicer
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

_ADMIN_THREADS = 4  # admin calls are rare and serialized by the controller


class AdminServicer(pbg.EmbeddingServiceServicer):
    """The admin side of one EmbeddingServicer; Lookup stays UNIMPLEMENTED here."""

    def __init__(self, servicer: EmbeddingServicer) -> None:
        self.servicer = servicer

    def LoadVersion(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext
                    ) -> pb.VersionInfo:
        return self.servicer.load_version(request, context)

    def UnloadVersion(self, request: pb.UnloadVersionRequest, context: grpc.ServicerContext
                      ) -> pb.VersionInfo:
        return self.servicer.unload_version(request, context)

    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
                     ) -> pb.ListVersionsResponse:
        return self.servicer.ListVersions(request, context)

    def CheckFit(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext
                 ) -> pb.FitInfo:
        return self.servicer.CheckFit(request, context)

    def ApplyDeltas(self, request: pb.ApplyDeltasRequest, context: grpc.ServicerContext
                    ) -> pb.VersionInfo:
        return self.servicer.apply_deltas(request, context)


def start_admin_server(servicer: EmbeddingServicer, host: str, port: int, *, worker: bool
                       ) -> tuple[grpc.Server, int, int]:
    """Bind and start the admin server; from then on the data port refuses admin RPCs.
    Returns (server, admin port, private port for siblings or 0 unless `worker`).
    RuntimeError when a port cannot be bound."""
    server = grpc.server(ThreadPoolExecutor(max_workers=_ADMIN_THREADS,
                                            thread_name_prefix="admin"),
                         options=[("grpc.so_reuseport", 1 if worker else 0)])
    pbg.add_EmbeddingServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AdminServicer(servicer), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    private = server.add_insecure_port("127.0.0.1:0") if worker else 0
    server.start()
    servicer.admin_port = bound
    return server, bound, private
