"""The synthetic click log and demo training, at tiny sizes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from modelpack.schema import FeatureSchema, TableSpec, validate_schema
from modelpack.synth import ClickLog, demo_schema, fit_normalization, generate_log
from modelpack.train import (
    TrainedModel,
    auc,
    fake_quant_int4,
    int4_tables,
    score_float,
    score_log,
    train_model,
)

ROWS, DIM = 20_000, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    # spin-waiting made training ~30x slower (15 s instead of 0.5 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world() -> tuple[FeatureSchema, list[TableSpec], ClickLog, ClickLog]:
    schema, tables = demo_schema(ROWS, dim=DIM)
    train, held_out = generate_log(4_000, 8, 0, seed=1), generate_log(800, 8, 0, seed=2)
    return fit_normalization(schema, train), tables, train, held_out


@pytest.fixture(scope="module")
def model(world: tuple[FeatureSchema, list[TableSpec], ClickLog, ClickLog]) -> TrainedModel:
    schema, tables, train, _ = world
    # Small data learns faster with smaller batches and larger steps than the demo's defaults.
    return train_model(schema, tables, train, seed=0, progress=False, batch_size=256, lr=5e-3,
                       embedding_lr=3e-2, dense_config={"mlp_dims": [32, 16]})


def _arrays(log: ClickLog) -> dict[str, np.ndarray]:
    return {f.name: getattr(log, f.name) for f in dataclasses.fields(log)
            if isinstance(getattr(log, f.name), np.ndarray)}


def test_auc_hand_computed() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    # Ties count half: pairs (0.5 vs 0.5) = 0.5, the other three = 1 -> 3.5 / 4.
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875)
    assert auc(np.array([1, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_log_is_deterministic_and_days_differ() -> None:
    a, b = _arrays(generate_log(300, 4, 0, seed=5)), _arrays(generate_log(300, 4, 0, seed=5))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = generate_log(300, 4, 0, seed=6)
    assert not np.array_equal(a["ad_id"], other.ad_id)
    day1 = generate_log(300, 4, 1, seed=5)
    assert not np.array_equal(a["click_prob"], day1.click_prob)


def test_log_has_sane_ctr_ids_and_shapes() -> None:
    log = generate_log(2_000, 8, 0, seed=3)
    assert log.num_requests == 2_000 and log.num_examples == 16_000
    assert 0.04 < log.labels.mean() < 0.15
    for ids in (log.user_id, log.user_geo, log.recent_ads, log.ad_id, log.advertiser_id,
                log.ad_category):
        assert ids.dtype == np.int64 and ids.min() > 0 and ids.max() < 2**62
    assert np.median(log.ad_id) > 2**40  # scattered 64-bit-ish IDs, not 0..n-1
    lengths = np.diff(log.recent_offsets)
    assert lengths.min() == 0 and lengths.max() <= 20 and lengths.mean() > 2
    assert len(log.recent_ads) == log.recent_offsets[-1]
    _, counts = np.unique(log.ad_id, return_counts=True)
    assert counts.max() > 10 * counts.mean()  # power-law: a few ads get much of the traffic


def test_schema_matches_the_brief(world: tuple[FeatureSchema, list[TableSpec], ClickLog,
                                               ClickLog]) -> None:
    schema, tables, _, _ = world
    validate_schema(schema, tables)
    assert [t.name for t in tables] == ["unified"]
    assert [(f.name, f.side, f.hash_seed) for f in schema.sparse] == [
        ("user_id", "user", 101), ("user_geo", "user", 102), ("user_recent_ads", "user", 103),
        ("ad_id", "candidate", 201), ("advertiser_id", "candidate", 202),
        ("ad_category", "candidate", 203)]
    recent = schema.sparse[2]
    assert (recent.multi_valued, recent.max_length, recent.pooling) == (True, 20, "mean")
    assert [(f.name, f.normalization) for f in schema.dense] == [
        ("user_activity", "log1p_standard"), ("ad_ctr_prior", "standard"),
        ("ad_bid", "log1p_standard")]
    assert all(f.std != 1.0 and f.mean != 0.0 for f in schema.dense)  # fitted


def test_to_requests_shape_is_exact() -> None:
    log = generate_log(10, 3, 0, seed=4)
    reqs = log.to_requests(2, 5)
    assert [r["request_id"] for r in reqs] == ["eval-000002", "eval-000003", "eval-000004"]
    json.dumps(reqs)  # plain Python types only
    for r in reqs:
        assert list(r) == ["request_id", "model", "user", "candidates", "labels"]
        assert r["model"] == "ads_ctr"
        user = r["user"]
        assert isinstance(user, dict)
        assert list(user) == ["user_id", "user_geo", "user_recent_ads", "user_activity"]
        assert type(user["user_id"]) is int and type(user["user_geo"]) is int
        assert all(type(v) is int for v in user["user_recent_ads"])
        assert type(user["user_activity"]) is float
        cands, labels = r["candidates"], r["labels"]
        assert isinstance(cands, list) and isinstance(labels, list) and len(cands) == 3
        for c in cands:
            assert list(c) == ["ad_id", "advertiser_id", "ad_category", "ad_ctr_prior", "ad_bid"]
            assert [type(v) for v in c.values()] == [int, int, int, float, float]
        assert all(type(v) is int and v in (0, 1) for v in labels)
    assert reqs[0]["labels"] == [int(v) for v in log.labels[6:9]]


def test_tiny_model_learns(world: tuple[FeatureSchema, list[TableSpec], ClickLog, ClickLog],
                           model: TrainedModel) -> None:
    schema, _, _, held_out = world
    assert model.tables["unified"].shape == (ROWS, DIM)
    assert model.tables["unified"].dtype == np.float32
    assert model.config["num_sparse"] == 6 and model.config["embedding_dim"] == DIM
    fp32 = auc(held_out.labels, score_log(model, schema, held_out))
    int4 = auc(held_out.labels, score_log(model, schema, held_out, int4=True))
    assert fp32 > 0.65
    assert int4 > fp32 - 0.005


def test_request_scoring_matches_log_scoring(
    world: tuple[FeatureSchema, list[TableSpec], ClickLog, ClickLog], model: TrainedModel
) -> None:
    schema, _, _, held_out = world
    # A shorter max_length checks both paths truncate bags the same way (first IDs kept).
    recent = dataclasses.replace(schema.sparse[2], max_length=3)
    short = dataclasses.replace(schema, sparse=(*schema.sparse[:2], recent, *schema.sparse[3:]))
    for s in (schema, short):
        want = score_log(model, s, held_out)[: 40 * 8]
        got = score_float(model, s, held_out.to_requests(0, 40))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(score_log(model, short, held_out), score_log(model, schema, held_out))


def test_fake_quant_matches_the_int4_codec() -> None:
    w = torch.randn(256, DIM) * 0.1
    w[3] = 0.25  # a constant row must survive
    got = fake_quant_int4(w).numpy()
    want = int4_tables({"t": w.numpy()})["t"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Straight-through: the gradient is the identity.
    x = w.clone().requires_grad_(True)
    fake_quant_int4(x).sum().backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(w))


def test_warm_start_checks_shapes(world: tuple[FeatureSchema, list[TableSpec], ClickLog,
                                                ClickLog], model: TrainedModel) -> None:
    schema, _, train, _ = world
    with pytest.raises(ValueError, match="init_from"):
        train_model(schema, [TableSpec("unified", ROWS // 2, DIM)], train, init_from=model,
                    progress=False, dense_config={"mlp_dims": [32, 16]})
