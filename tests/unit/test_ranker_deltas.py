"""Delta seqs in the ranker: one seq per batch, PUT /admin/v1/versions/{v}/seq and its
refusals, exact reads at seq > 0 with --local-tables, the seq in answers and metrics, a
start at the desired state's committed seq, the --workers group state's seqs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from modelpack import desired
from modelpack.delta_read import TableDelta, fold, overlay_rows, read_chain
from modelpack.delta_write import write_delta
from modelpack.desired import DesiredModel
from modelpack.lookup import Packed
from modelpack.requests import DecodedRequest
from modelpack.scorer import OfflineScorer
from protos import ranker_pb2
from ranker_server.batcher import Batcher, RankItem
from ranker_server.codec import encode_request
from ranker_server.config import RankerConfig
from ranker_server.group import _model_of, _serves
from ranker_server.inprocess import serve_in_process
from ranker_server.metrics import Metrics
from ranker_server.versions import LoadedVersion, VersionRegistry
from tests.helpers_store import TINY_SCHEMA, loaded_tiny_version, tiny_request, tiny_version
from tests.unit.delta_helpers import forge

TOKEN = "delta-admin"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SEQ_URL = "/admin/v1/versions/{}/seq"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny/v1 with deltas 1 (every row) and 2 (half the rows); tiny/v2 whose delta 2 does
    not follow its delta 1."""
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(7)
    for v, seed in (("v1", 1), ("v2", 2)):
        tiny_version(root, v, seed=seed)
        for n in (1000, 500):
            rows = np.sort(rng.choice(1000, n, replace=False)).astype(np.int64)
            write_delta(root / "tiny" / v, {
                "unified": (rows, 2 * rng.standard_normal((n, 16)).astype(np.float32)),
                "cats": (np.arange(37), 2 * rng.standard_normal((37, 16)).astype(np.float32))})
    forge(root / "tiny" / "v2", 2,
          manifest=lambda raw: raw.update(prev_fingerprint="sha256:" + "0" * 64))
    (root / "token").write_text(TOKEN)
    return root


def _config(store: Path, **kw: Any) -> RankerConfig:
    return dataclasses.replace(
        RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                     admin_token_file=store / "token", max_batch_wait_ms=5.0,
                     max_candidates=50, max_batch_candidates=400), **kw)


class _Overlaid:
    """A table reader answering V's rows with deltas 1..seq laid over (the reference)."""

    def __init__(self, reader: Any, delta: TableDelta) -> None:
        self.reader, self.delta = reader, delta

    def gather(self, rows: npt.NDArray[np.int64]) -> Packed:
        return overlay_rows(self.reader.gather(rows), rows, [self.delta])


def offline_at(vdir: Path, seq: int) -> OfflineScorer:
    """The offline scorer of V read at `seq`: modelpack.scorer over overlay_rows."""
    scorer = OfflineScorer(vdir)
    chain = read_chain(vdir, seq)
    for name, reader in list(scorer.readers.items()):
        scorer.readers[name] = _Overlaid(  # type: ignore[assignment]
            reader, fold([d.tables[name] for d in chain if name in d.tables]))
    return scorer


def test_batches_pin_one_seq_even_when_it_changes_mid_stream(tmp_path: Path) -> None:
    lv = loaded_tiny_version(tmp_path)
    got: list[tuple[int, list[int]]] = []  # per batch: the seq it read at, its requests

    class Recording:
        async def run(self, version: LoadedVersion, requests: list[DecodedRequest],
                      timeout_s: float, *, seq: int | None = None) -> list[npt.NDArray[np.float32]]:
            assert seq is not None  # the batcher always pins one
            got.append((seq, [id(r) for r in requests]))
            await asyncio.sleep(0.002)  # batches form while this one runs
            return [np.zeros(r.num_candidates, np.float32) for r in requests]

    async def main() -> list[RankItem]:
        metrics = Metrics()
        registry = VersionRegistry("tiny", metrics)
        registry.add(lv)
        registry.activate("v1")
        batcher = Batcher(_config(tmp_path, max_batch_wait_ms=1.0), Recording(),  # type: ignore[arg-type]
                          metrics)
        batcher.start()
        items = []
        for i in range(120):
            if i % 30 == 29:  # the admin switch, between requests already queued
                registry.set_seq(lv, lv.seq + 1, None, fresh=False)
            req = DecodedRequest(num_candidates=1 + i % 3, sparse={}, dense=np.zeros((1, 0), np.float32))
            items.append(batcher.submit(registry.acquire(), req, time.monotonic() + 5.0))
            if i % 4 == 0:
                await asyncio.sleep(0.001)
        await asyncio.gather(*(it.future for it in items))
        await batcher.drain(1.0)
        return items

    items = asyncio.run(main())
    seq_of = {rid: seq for seq, rids in got for rid in rids}
    assert all(it.seq == seq_of[id(it.request)] for it in items)  # each answer names its batch's
    assert {seq for seq, _ in got} == {0, 1, 2, 3, 4}
    assert any(len(rids) > 1 for _, rids in got)  # requests did share batches
    firsts = [seq_of[id(it.request)] for it in items]
    assert firsts == sorted(firsts)  # a batch formed after a switch never reads the older seq


def test_admin_seq_endpoint_and_exact_reads(store: Path) -> None:
    reqs = [tiny_request(2 + i % 5, seed=i) for i in range(24)]
    at = {s: offline_at(store / "tiny" / "v1", s) for s in (0, 1, 2)}

    async def body(client: Any, state: Any) -> None:
        async def put(seq: Any, version: str = "v1", **extra: Any) -> Any:
            return await client.put(SEQ_URL.format(version), json={"seq": seq, **extra},
                                    headers=AUTH)

        async def scored(r: dict[str, Any]) -> tuple[int, list[float]]:
            a = await client.post("/v1/rank", json=r)
            assert a.status_code == 200, a.text
            return a.json()["seq"], a.json()["scores"]

        def check(seq: int, r: dict[str, Any], scores: list[float]) -> None:
            np.testing.assert_allclose(scores, at[seq].score(r), atol=2e-3, rtol=0)

        assert (await scored(reqs[0]))[0] == 0
        r = await put(2)
        assert r.status_code == 200, r.text
        info = r.json()
        assert (info["seq"], info["previous_seq"], info["version"]) == (2, 0, "v1")
        assert info["delta_fingerprint"].startswith("sha256:") and info["delta_written_at"] > 0
        again = await put(2, fingerprint=info["delta_fingerprint"])  # idempotent, checked
        assert (again.status_code, again.json()["previous_seq"]) == (200, 2)
        for q in reqs[:6]:
            seq, scores = await scored(q)
            assert seq == 2
            check(2, q, scores)
        assert not np.allclose(at[2].score(reqs[0]), at[0].score(reqs[0]), atol=2e-3)
        # The seq changes while requests are in flight: each answer is exact at its own seq.
        tasks = [asyncio.ensure_future(scored(q)) for q in reqs]
        await asyncio.sleep(0)
        assert (await put(1)).json()["previous_seq"] == 2  # a revert
        seen = set()
        for q, (seq, scores) in zip(reqs, await asyncio.gather(*tasks), strict=True):
            check(seq, q, scores)
            seen.add(seq)
        assert seen <= {1, 2}
        pb = await client.post("/v1/rank", content=encode_request(reqs[0], TINY_SCHEMA),
                               headers={"content-type": "application/x-protobuf"})
        assert ranker_pb2.RankResponse.FromString(pb.content).seq == 1
        listing = (await client.get("/admin/v1/versions", headers=AUTH)).json()
        assert [(v["version"], v["seq"]) for v in listing["versions"]] == [("v1", 1)]
        sample = state.metrics.registry.get_sample_value
        assert sample("ranker_delta_seq", {"model": "tiny", "version": "v1"}) == 1
        assert sample("ranker_delta_freshness_seconds_count", {"model": "tiny"}) == 1  # 0 -> 2
        assert 0 < sample("ranker_delta_age_seconds", {"model": "tiny", "version": "v1"}) < 600
        assert (await put(0, fingerprint=info["fingerprint"])).status_code == 200  # V's own
        assert sample("ranker_delta_age_seconds", {"model": "tiny", "version": "v1"}) is None

    async def main() -> None:
        async with serve_in_process(_config(store)) as (client, state):
            await body(client, state)

    asyncio.run(main())


REFUSALS: list[tuple[str, Any, int, str]] = [
    ("v1", {"seq": -1}, 422, "seq: must be an integer"),
    ("v1", {"seq": True}, 422, "seq: must be an integer"),
    ("v1", {"seq": "2"}, 422, "seq: must be an integer"),
    ("v1", {}, 422, "seq: must be an integer"),
    ("v1", {"seq": 1, "fingerprint": 7}, 422, "fingerprint: must be a string"),
    ("v1", {"seq": 3}, 422, "tiny/v1 delta 3: directory is missing"),
    ("v1", {"seq": 2, "fingerprint": "sha256:" + "1" * 64}, 409, "its fingerprint in"),
    ("v2", {"seq": 2}, 422, "tiny/v2 delta 2: follows sha256:000"),
    ("v9", {"seq": 1}, 404, "'v9' of tiny is not loaded"),
    ("v1", [1], 422, "body: must be a JSON object"),
]


def test_admin_seq_refusals(store: Path) -> None:
    async def main() -> None:
        async with serve_in_process(_config(store)) as (client, state):
            assert (await client.post("/admin/v1/versions", json={"version": "v2"},
                                      headers=AUTH)).status_code == 200
            for version, body, status, words in REFUSALS:
                # the token before anything else, the body included
                r = await client.put(SEQ_URL.format(version), content=b"\xff")
                assert r.status_code == 401
                r = await client.put(SEQ_URL.format(version), json=body, headers=AUTH)
                assert (r.status_code, words in r.json()["detail"]) == (status, True), r.text
            # refused: nothing changed
            assert [lv.seq for lv in state.registry.versions.values()] == [0, 0]
            r = await client.put(SEQ_URL.format("v1"), content=b"{", headers=AUTH)
            assert r.status_code == 400

    asyncio.run(main())


def test_a_restart_starts_at_the_committed_seq(store: Path, tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    desired.write(path, {"tiny": DesiredModel("v1", ("v1",), {"v1": 1.0}, deltas={"v1": 2})})
    req = tiny_request(4, seed=3)

    async def main() -> None:
        async with serve_in_process(_config(store, desired_state=path)) as (client, state):
            a = (await client.post("/v1/rank", json=req)).json()
            assert a["seq"] == 2
            np.testing.assert_allclose(a["scores"], offline_at(store / "tiny" / "v1", 2).score(req),
                                       atol=2e-3, rtol=0)
            sample = state.metrics.registry.get_sample_value
            assert sample("ranker_delta_seq", {"model": "tiny", "version": "v1"}) == 2
            # a start is no advance: nothing for the freshness histogram
            assert not sample("ranker_delta_freshness_seconds_count", {"model": "tiny"})

    asyncio.run(main())


def test_the_group_state_keeps_each_versions_seq() -> None:
    listing = {"model": "tiny", "active": "v1", "split": {"v1": 1.0}, "versions": [
        {"version": "v1", "fingerprint": "sha256:a", "state": "active", "seq": 4},
        {"version": "v2", "fingerprint": "sha256:b", "state": "prepared", "seq": 0}]}
    got = _model_of(json.dumps(listing).encode())
    assert got is not None and got.deltas == {"v1": 4}
    assert _serves(got) == _serves(DesiredModel("v1", ("v1", "v2"), {"v1": 1.0},
                                                deltas={"v1": 4, "v2": 0}))
    assert _serves(got) != _serves(DesiredModel("v1", ("v1", "v2"), {"v1": 1.0},
                                                deltas={"v1": 3}))
