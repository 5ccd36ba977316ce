"""embedding_server.config: flags -> one validated ServerConfig, errors that name the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_server.config import (
    ConfigError,
    config_from_args,
    parse_memory_budget,
    worker_argv,
)
from embedding_server.peers import merge_version_lists
from protos import embedding_pb2 as pb


@pytest.mark.parametrize(("text", "want"), [
    ("123", 123), ("8G", 8 * 10**9), ("8GiB", 8 * 2**30), ("1.5Mi", int(1.5 * 2**20)),
    ("0.5", 500), ("1.0", 1000), ("2k", 2000),
])
def test_memory_budget_forms(text: str, want: int) -> None:
    assert parse_memory_budget(text, total=1000) == want


@pytest.mark.parametrize("text", ["lots", "-1", "1.5", "0.0", "8X"])
def test_memory_budget_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_memory_budget(text, total=1000)


def test_parse_and_validate(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("  s3cret\n")
    cfg = config_from_args(["--store", str(tmp_path), "--shard", "1", "--num-shards", "3",
                            "--preload", "m/v1", "--preload", "m/v2", "--admin-token-file",
                            str(tmp_path / "tok"), "--memory-budget", "1G", "--workers", "2"])
    assert (cfg.shard, cfg.num_shards, cfg.preload) == (1, 3, (("m", "v1"), ("m", "v2")))
    assert cfg.admin_token == "s3cret" and "s3cret" not in repr(cfg)
    assert cfg.memory_budget_bytes == 10**9 and cfg.threads == cfg.max_concurrent + cfg.max_streams + 8
    child = config_from_args(worker_argv(cfg, 4321, tmp_path))
    assert (child.port, child.workers, child.peer_dir, child.preload) == (4321, 1, tmp_path, cfg.preload)
    assert child.admin_token == "s3cret" and child.metrics_port is None and child.port_file is None


@pytest.mark.parametrize(("args", "message"), [
    (["--shard", "3", "--num-shards", "3"], r"--shard must be in \[0, 3\), got 3"),
    (["--num-shards", "0"], "--num-shards must be >= 1, got 0"),
    (["--port", "70000"], r"--port must be in \[0, 65535\], got 70000"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--max-rows-per-request", "0"], "--max-rows-per-request must be >= 1, got 0"),
    (["--max-bags-per-request", "0"], "--max-bags-per-request must be >= 1, got 0"),
    (["--max-tables-per-request", "0"], "--max-tables-per-request must be >= 1, got 0"),
    (["--max-response-bytes", "0"], "--max-response-bytes must be >= 1, got 0"),
    (["--grace-period", "-1"], "--grace-period must be >= 0, got -1.0"),
    (["--preload", "m"], "--preload 'm': expected MODEL/VERSION"),
    (["--preload", "m/.."], "invalid version name"),
    (["--preload", "m/v1\n"], r"invalid version name 'v1\\n'"),
    (["--preload", "m" * 10_000 + "/v1"], r"invalid model name 'm{39}\.\.\. \(9962 more characters\)"),
    (["--log-level", "LOUD"], "--log-level must be"),
])
def test_bad_values_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(["--store", str(tmp_path), *args])


@pytest.mark.parametrize("flag", ["--admin-token-file", "--lookup-token-file"])
def test_missing_or_empty_token_file(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"{flag} .*nope: cannot read it"):
        config_from_args(["--store", str(tmp_path), flag, str(tmp_path / "nope")])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=f"{flag} is empty"):
        config_from_args(["--store", str(tmp_path), flag, str(tmp_path / "empty")])


def test_cost_limits_and_lookup_token_reach_the_workers(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("d4ta\n")
    cfg = config_from_args(["--store", str(tmp_path), "--lookup-token-file", str(tmp_path / "data"),
                            "--max-bags-per-request", "7", "--max-tables-per-request", "8",
                            "--max-response-bytes", "9", "--workers", "2"])
    assert cfg.lookup_token() == "d4ta" and cfg.admin_token is None
    child = config_from_args(worker_argv(cfg, 4321, tmp_path))
    assert (child.lookup_token(), child.max_bags_per_request, child.max_tables_per_request,
            child.max_response_bytes) == ("d4ta", 7, 8, 9)
    defaults = config_from_args(["--store", str(tmp_path)])
    assert (defaults.lookup_token(), defaults.max_bags_per_request, defaults.max_tables_per_request,
            defaults.max_response_bytes) == (None, 1 << 20, 1024, 64 << 20)


def test_worker_views_merge_to_the_least_ready_state() -> None:
    def info(version: str, state: int, in_flight: int = 0) -> pb.VersionInfo:
        return pb.VersionInfo(model="m", version=version, state=state, in_flight=in_flight)  # type: ignore[arg-type]

    own = [info("v1", pb.VERSION_STATE_READY, 2), info("v2", pb.VERSION_STATE_READY)]
    other = [info("v1", pb.VERSION_STATE_READY, 3), info("v2", pb.VERSION_STATE_FAILED),
             info("v3", pb.VERSION_STATE_READY)]
    merged = {v.version: v for v in merge_version_lists(own, [other])}
    assert merged["v1"].state == pb.VERSION_STATE_READY and merged["v1"].in_flight == 5
    assert merged["v2"].state == pb.VERSION_STATE_FAILED
    assert merged["v3"].state == pb.VERSION_STATE_LOADING  # not in every worker yet
