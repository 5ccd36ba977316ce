"""Ranker configuration: shard targets, validation messages, flags and environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ranker_server.__main__ import build_parser, config_from_args
from ranker_server.config import ConfigError, RankerConfig, parse_shards


def test_parse_shards() -> None:
    assert parse_shards("127.0.0.1:5001") == (("127.0.0.1:5001",),)
    assert parse_shards("a:1|b:2, c:3") == (("a:1", "b:2"), ("c:3",))
    assert parse_shards("dns:///emb-0.emb:50051,dns:///emb-1.emb:50051") == (
        ("dns:///emb-0.emb:50051",), ("dns:///emb-1.emb:50051",))
    for bad in ("", "a:1,,b:2", "a:1|", "nohost", "a:b", "dns:///x:1|a:2"):
        with pytest.raises(ConfigError, match="embedding_shards"):
            parse_shards(bad)


def _ok(tmp_path: Path, **kw: Any) -> RankerConfig:
    return RankerConfig(store=tmp_path, embedding_shards=(("a:1",),), **kw)


@pytest.mark.parametrize("change, field", [
    ({"model": "../x"}, "model"),
    ({"version": ""}, "version"),
    ({"store": Path("/nonexistent/store")}, "store"),
    ({"embedding_shards": ()}, "embedding_shards"),
    ({"local_tables": True}, "embedding_shards"),  # both given
    ({"device": "tpu"}, "device"),
    ({"port": 70000}, "port"),
    ({"max_queue": 0}, "max_queue"),
    ({"max_batch_wait_ms": -1.0}, "max_batch_wait_ms"),
    ({"max_candidates": 5000}, "max_candidates"),
    ({"default_timeout_ms": 0}, "default_timeout_ms"),
    ({"default_timeout_ms": 90_000}, "default_timeout_ms"),
    ({"admin_token_file": Path("/nonexistent/token")}, "admin_token_file"),
    ({"log_level": "loud"}, "log_level"),
])
def test_validation_names_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    cfg = dataclasses.replace(_ok(tmp_path), **change)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value).startswith(field) or f"{field} name" in str(e.value), str(e.value)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        _ok(tmp_path, admin_token_file=tmp_path / "token").validate()
    (tmp_path / "token").write_text("s3cret\n")
    assert _ok(tmp_path, admin_token_file=tmp_path / "token").validate().admin_token() == "s3cret"


def test_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKER_MAX_QUEUE", "7")
    monkeypatch.setenv("RANKER_EMBEDDING_SHARDS", "h:1|h:2,h:3")
    args = build_parser().parse_args(["--store", str(tmp_path), "--port", "0",
                                      "--max-batch-wait-ms", "2.5", "--debug-serial-lookups"])
    cfg = config_from_args(args)
    assert cfg.max_queue == 7 and cfg.port == 0 and cfg.max_batch_wait_ms == 2.5
    assert cfg.embedding_shards == (("h:1", "h:2"), ("h:3",))
    assert cfg.debug_serial_lookups and not cfg.local_tables
    args = build_parser().parse_args(["--store", str(tmp_path), "--max-queue", "3"])
    assert config_from_args(args).max_queue == 3  # the flag wins over the environment
