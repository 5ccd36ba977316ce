"""CPU embedding server: memory-mapped INT4 tables served over gRPC (EmbeddingService).

Modules: config (flags), table_store (verify + mmap a version's shard files),
fbgemm_tbe (FBGEMM kernel over the mapped bytes), versions (load/unload/drain state),
lookup (request semantics), wire (answers as protobuf wire bytes), servicer (gRPC +
status codes), streams (LookupStream), errors (codes and reasons), auth, metrics, peers
(--workers admin fan-out), server (one process), workers (supervisor), client (the
ranker's door in; imports nothing else from this package).
"""
