"""The freshness scenario's parts without a stack: AUC over time, lags, the answer check, the load.

The scenario itself (loadtest/stack/fresh.py) runs minutes against the whole stack; these
test its arithmetic and its load driver against a real loopback HTTP server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.locust.served import auc
from loadtest.stack import fresh_timeline as tl
from loadtest.stack.fresh import Marks, copy_store
from loadtest.stack.fresh_load import Load, parse_rank_answer
from protos import ranker_pb2

RNG = np.random.default_rng(7)
LABELS = [RNG.integers(0, 2, 8).astype(np.float32) for _ in range(40)]
GOOD = [RNG.random(8).astype(np.float32) for _ in range(40)]


def answer(t: float, i: int, *, ranker: int = 0, seq: int = 0, version: str = "v1",
           scores: np.ndarray | None = None, status: int = 200) -> tl.Answer:
    return tl.Answer(t, t + 0.01, ranker, i, status, version, seq,
                     GOOD[i] if scores is None and status == 200 else scores)


def test_windows_are_served_auc_per_time_bin_paired_with_the_baseline() -> None:
    answers = [answer(100 + 0.5 * i, i) for i in range(40)]  # 20 s: two 10 s windows
    answers.append(answer(101, 3, status=503))  # a failure counts nowhere
    base = [1 - s for s in GOOD]  # the baseline ranks every request backwards
    wins = tl.windows(answers, LABELS, base, 10.0, t0=100)
    assert [(w.start, w.end, w.requests) for w in wins] == [(100, 110, 20), (110, 120, 20)]
    first = auc(np.concatenate(LABELS[:20]), np.concatenate(GOOD[:20]))
    assert wins[0].served_auc == pytest.approx(first)
    assert wins[0].baseline_auc == pytest.approx(1 - first)
    assert wins[1].seqs == (0,) and wins[1].versions == ("v1",)
    with pytest.raises(ValueError, match="window width must be > 0"):
        tl.windows(answers, LABELS, base, 0)
    assert tl.windows([answer(1, 0, status=503)], LABELS, base, 5) == []


def test_phase_auc_splits_by_send_time() -> None:
    answers = [answer(float(i), i) for i in range(40)]
    phases = [tl.Phase("a", 0, 20), tl.Phase("b", 20, 40), tl.Phase("empty", 50, 60)]
    got = tl.phase_auc(answers, LABELS, GOOD, phases)
    assert got["a"]["requests"] == 20 and got["b"]["requests"] == 20 and got["a"]["failed"] == 0
    assert got["a"]["p50_ms"] == pytest.approx(10.0)
    assert got["a"]["served_auc"] == pytest.approx(got["a"]["baseline_auc"])
    assert got["empty"]["requests"] == 0 and np.isnan(got["empty"]["served_auc"])
    assert tl.phase_of(25, phases) == "b" and tl.phase_of(45, phases) == ""


def test_freshness_lag_waits_for_every_ranker_and_counts_skips() -> None:
    written = {1: 10.0, 2: 20.0, 3: 21.0, 4: 40.0}
    serving = {0: [(9.0, 0), (10.5, 1), (22.0, 3)],  # skips 2: serving 3 serves 2's rows too
               1: [(11.0, 0), (12.0, 1), (21.5, 2), (23.0, 3)]}
    lags = tl.freshness_lags(written, serving)
    assert lags == {1: pytest.approx(2.0), 2: pytest.approx(2.0), 3: pytest.approx(2.0),
                    4: None}
    s = tl.lag_summary(lags)
    assert s["deltas"] == 4 and s["never_served"] == 1 and s["p50_s"] == 2.0
    assert tl.lag_summary({1: None})["p99_s"] is None
    # from answers: per ranker, its answers' (time, seq) of one version
    answers = [answer(5, 0, ranker=1, seq=2), answer(1, 1, ranker=1, seq=1),
               answer(2, 2, ranker=0, seq=1, version="v2"), answer(3, 3, status=500)]
    assert tl.first_serving(answers, "v1", 2) == {0: [], 1: [(1.01, 1), (5.01, 2)]}


def test_check_answers_against_the_offline_read_they_name() -> None:
    offline = {("v1", 0): {0: GOOD[0], 1: GOOD[1]},
               ("v1", 1): {0: GOOD[0] + 0.1, 1: GOOD[1]}}  # request 1: seq 1 changed nothing
    answers = [answer(0, 0, seq=0), answer(1, 0, seq=1, scores=GOOD[0] + 0.1),
               answer(2, 1, seq=1), answer(3, 0, seq=1, scores=GOOD[0] + 0.0005),
               answer(4, 0, seq=1), answer(5, 1, seq=7), answer(6, 1, status=503)]
    c = tl.check_answers(answers, offline, 2e-3)
    assert c.checked == 6 and c.at_positive_seq == 4
    # 3: off by 0.1 though within tolerance of seq 0's; 4: seq 0's scores naming seq 1; 5: seq 7
    assert [m.split(":")[0] for m in c.mismatched] == [
        "request 0 from ranker 0 at v1@1", "request 0 from ranker 0 at v1@1",
        "request 1 from ranker 0 names v1@7, which was never written"]
    assert "scores differ from v1@1's by 0.1 > 0.002" in c.mismatched[1]
    assert c.resolved == 1  # only answer 1 could not pass as seq 0's; request 1 is the same at both


def test_seq_series_is_in_time_order() -> None:
    ts, seqs = tl.seq_series([answer(3, 0, seq=2), answer(1, 1, seq=1),
                              answer(2, 2, seq=9, version="v2")], "v1")
    assert ts.tolist() == [1.01, 3.01] and seqs.tolist() == [1, 2]


def test_parse_rank_answer() -> None:
    good = ranker_pb2.RankResponse(version="v1", seq=3, scores=np.array([0.1, 0.9], np.float32).tobytes())
    v, s, scores, err = parse_rank_answer(200, good.SerializeToString(), 2)
    assert (v, s, err) == ("v1", 3, "") and scores is not None and scores.tolist() == \
        pytest.approx([0.1, 0.9])
    assert parse_rank_answer(200, good.SerializeToString(), 3)[3] == "2 scores for 3 candidates"
    assert parse_rank_answer(503, b'{"detail":"x"}', 2)[3].startswith("HTTP 503")
    assert "no version" in parse_rank_answer(200, b"", 2)[3]
    assert parse_rank_answer(200, b"\xff\xff", 2)[3].startswith("unreadable answer")
    bad = ranker_pb2.RankResponse(version="v1", scores=np.array([np.nan, 1], np.float32).tobytes())
    assert parse_rank_answer(200, bad.SerializeToString(), 2)[3] == \
        "scores not finite probabilities"


@pytest.fixture()
def rankers() -> Iterator[list[str]]:
    """Two loopback HTTP servers answering RankResponse(version, seq = their index)."""
    loop = asyncio.new_event_loop()
    ports: list[int] = []
    ready = threading.Event()

    def handler(seq: int):  # type: ignore[no-untyped-def]
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                n = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                             if ln.lower().startswith(b"content-length")))
                body = await r.readexactly(n)
                scores = np.full(int(body.decode()), 0.5, np.float32).tobytes()
                out = ranker_pb2.RankResponse(version="v1", seq=seq, scores=scores)
                payload = out.SerializeToString()
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await w.drain()
            w.close()
        return handle

    stop = asyncio.Event()

    async def serve() -> None:
        servers = [await asyncio.start_server(handler(k), "127.0.0.1", 0) for k in range(2)]
        ports.extend(s.sockets[0].getsockname()[1] for s in servers)
        ready.set()
        await stop.wait()
        for s in servers:
            s.close()

    t = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    t.start()
    ready.wait(5)
    yield [f"http://127.0.0.1:{p}" for p in ports]
    loop.call_soon_threadsafe(stop.set)
    t.join(5)
    loop.close()


def test_load_sends_round_robin_at_its_rate_and_keeps_every_answer(rankers: list[str]) -> None:
    bodies, sizes = [b"3", b"4", b"5"], [3, 4, 5]
    load = Load(rankers, bodies, sizes, rate=100).start()
    threading.Event().wait(0.5)
    answers = load.stop()
    assert 30 <= len(answers) <= 70
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    assert {a.ranker for a in answers} == {0, 1}
    assert all(a.seq == a.ranker and a.scores is not None and a.scores.size == sizes[a.index]
               for a in answers)
    with pytest.raises(ValueError, match="rate > 0"):
        Load(rankers, bodies, sizes, rate=0)


def test_store_copy_leaves_deltas_behind_and_phases_drop_empty_ones(tmp_path: Path) -> None:
    for v in ("v1", "v2"):
        (tmp_path / "src" / "ads_ctr" / v / "deltas" / "1").mkdir(parents=True)
        (tmp_path / "src" / "ads_ctr" / v / "manifest.json").write_text("{}")
    dst = copy_store(tmp_path / "src", tmp_path / "dst")
    assert (dst / "ads_ctr" / "v1" / "manifest.json").is_file()
    assert not (dst / "ads_ctr" / "v1" / "deltas").exists()
    assert (tmp_path / "src" / "ads_ctr" / "v1" / "deltas" / "1").is_dir()
    m = Marks(load=1, train=5, all_served=9, rollout=12, rolled=15, end=20)
    assert [p.name for p in m.phases()] == ["static v1", "deltas arriving", "v1 + all deltas",
                                            "rollout to v2", "v2"]
    assert [p.name for p in Marks(load=1, train=5, end=0).phases()] == ["static v1"]


def test_offline_truth_catches_rows_of_another_seq(tmp_path: Path) -> None:
    """Answers re-scored at the (version, seq) they name: another seq's scores, or a seq
    never written, are mismatches; the right read's scores pass."""
    from loadtest.stack.fresh_truth import EvalData, auc_at, for_answers, scores_at
    from modelpack.delta_train import delta_train
    from modelpack.delta_train_size import DeltaTrainSize
    from modelpack.demo import DemoSize, build_demo_store

    build_demo_store(tmp_path, DemoSize(rows=2000, requests=100, eval_requests=20), progress=False)
    model = tmp_path / "ads_ctr"
    delta_train(model / "v1", DeltaTrainSize(examples=1000, every=500, batch_size=256,
                                             embedding_lr=0.1))
    data = EvalData.load(model / "v2" / "eval.jsonl")
    n = len(data.requests)
    at1, at2 = (scores_at(model / "v1", s, data, range(n)) for s in (1, 2))
    stale = max(range(n), key=lambda i: float(np.abs(at1[i] - at2[i]).max()))
    assert float(np.abs(at1[stale] - at2[stale]).max()) > 2e-3  # delta 2 moved its scores
    answers = [tl.Answer(0, 0, 0, i, 200, "v1", 2, at2[i]) for i in range(n)]
    answers += [tl.Answer(0, 0, 1, stale, 200, "v1", 2, at1[stale]),  # seq 1's rows, naming 2
                tl.Answer(0, 0, 1, 0, 200, "v1", 3, at2[0])]  # a seq never written
    offline = for_answers(model, answers, data, ["v1", "v2"])
    assert set(offline) == {("v1", 1), ("v1", 2)}
    c = tl.check_answers(answers, offline, 2e-3)
    assert c.checked == n + 2 and len(c.mismatched) == 2, c.mismatched
    assert f"request {stale} from ranker 1 at v1@2" in c.mismatched[0]
    assert "v1@3, which was never written" in c.mismatched[1]
    assert 0.0 <= auc_at(model / "v1", 2, data) <= 1.0
