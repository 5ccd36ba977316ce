"""A synthetic ads click log drawn from a hidden world with real, learnable structure.

The world (users, geos, categories, advertisers, ads, their hidden taste and attribute
vectors) comes from one fixed seed, so every call sees the same world; only traffic
depends on the caller's seed. Day d applies d steps of drift (users' tastes rotate,
advertiser quality shifts, old ads retire and new ones launch), so a model trained on
day 1 really differs from one trained on day 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from modelpack.schema import DenseFeature, FeatureSchema, SparseFeature, TableSpec

WORLD_SEED = 20_250_101
TABLE = "unified"
MODEL_NAME = "ads_ctr"
# Demo defaults: 2M training examples (one epoch, ~30 s on 2 CPU cores).
DEMO_ROWS = 200_000
DEMO_DIM = 32
DEMO_REQUESTS = 125_000
DEMO_CANDIDATES = 16

_K = 16  # hidden taste dimensions
_GEOS, _USERS, _CATEGORIES, _ADVERTISERS = 300, 60_000, 60, 4_000
_AD_BLOCK, _LIVE_BLOCKS = 8_000, 5  # day d serves ad blocks d .. d+4: one block retires per day
_BASE, _TASTE, _GEO_CAT, _BID = -3.25, 1.3, 0.6, 0.15  # click logit weights
_RECENT_MAX, _RECENT_POOL = 20, 48
_ACTIVITY_LOG_MEAN = 1.5


def demo_schema(
    rows: int, dim: int = DEMO_DIM, num_shards: int = 2
) -> tuple[FeatureSchema, list[TableSpec]]:
    """The demo's features over one Unified Embedding table; dense mean/std are defaults."""
    sparse = (
        SparseFeature("user_id", "user", TABLE, 101),
        SparseFeature("user_geo", "user", TABLE, 102),
        SparseFeature("user_recent_ads", "user", TABLE, 103, multi_valued=True,
                      max_length=_RECENT_MAX, pooling="mean"),
        SparseFeature("ad_id", "candidate", TABLE, 201),
        SparseFeature("advertiser_id", "candidate", TABLE, 202),
        SparseFeature("ad_category", "candidate", TABLE, 203),
    )
    dense = (
        DenseFeature("user_activity", "user", "log1p_standard"),
        DenseFeature("ad_ctr_prior", "candidate", "standard"),
        DenseFeature("ad_bid", "candidate", "log1p_standard"),
    )
    return FeatureSchema(sparse, dense), [TableSpec(TABLE, rows, dim, num_shards)]


def fit_normalization(schema: FeatureSchema, log: ClickLog) -> FeatureSchema:
    """A copy of `schema` whose dense features' mean/std are fitted on `log` (use day 0)."""
    fitted = []
    for f in schema.dense:
        x = log.dense(f.name).astype(np.float64)
        if f.normalization == "none":
            fitted.append(f)
            continue
        if f.normalization == "log1p_standard":
            x = np.log1p(np.maximum(x, 0.0))
        std = float(x.std())
        fitted.append(replace(f, mean=float(x.mean()), std=std if std > 1e-12 else 1.0))
    return replace(schema, dense=tuple(fitted))


@dataclass(frozen=True)
class ClickLog:
    """Ranking requests with their labels. R requests, each with C candidates (E = R*C).

    User features are per request (R,), candidate features per example (E,), with the
    candidates of request r at examples [r*C, (r+1)*C). IDs are raw int64 entity IDs.
    """

    day: int
    candidates_per_request: int
    user_id: np.ndarray  # (R,) int64
    user_geo: np.ndarray  # (R,) int64
    recent_ads: np.ndarray  # (sum of lengths,) int64; request r's at recent_offsets[r:r+2]
    recent_offsets: np.ndarray  # (R+1,) int64
    user_activity: np.ndarray  # (R,) float64
    ad_id: np.ndarray  # (E,) int64
    advertiser_id: np.ndarray  # (E,) int64
    ad_category: np.ndarray  # (E,) int64
    ad_ctr_prior: np.ndarray  # (E,) float64
    ad_bid: np.ndarray  # (E,) float64
    labels: np.ndarray  # (E,) int8, 1 = click
    click_prob: np.ndarray  # (E,) float64, the hidden true probability (oracle AUC)

    @property
    def num_requests(self) -> int:
        return len(self.user_id)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def ids(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets) of a sparse feature: bag i is values[offsets[i]:offsets[i+1]]."""
        if name == "user_recent_ads":
            return self.recent_ads, self.recent_offsets
        single = {
            "user_id": self.user_id, "user_geo": self.user_geo, "ad_id": self.ad_id,
            "advertiser_id": self.advertiser_id, "ad_category": self.ad_category,
        }
        if name not in single:
            raise KeyError(f"click log has no sparse feature {name!r}")
        return single[name], np.arange(len(single[name]) + 1, dtype=np.int64)

    def dense(self, name: str) -> np.ndarray:
        """Raw (unnormalized) values of a dense feature, per request or per example."""
        table = {"user_activity": self.user_activity, "ad_ctr_prior": self.ad_ctr_prior,
                 "ad_bid": self.ad_bid}
        if name not in table:
            raise KeyError(f"click log has no dense feature {name!r}")
        return table[name]

    def to_requests(
        self, start: int, stop: int, model: str = MODEL_NAME
    ) -> list[dict[str, object]]:
        """Requests [start, stop) as JSON-ready ranking requests; ids are eval-<request index>."""
        c = self.candidates_per_request
        out: list[dict[str, object]] = []
        for r in range(max(start, 0), min(stop, self.num_requests)):
            lo, hi = int(self.recent_offsets[r]), int(self.recent_offsets[r + 1])
            ex = range(r * c, (r + 1) * c)
            out.append({
                "request_id": f"eval-{r:06d}",
                "model": model,
                "user": {
                    "user_id": int(self.user_id[r]),
                    "user_geo": int(self.user_geo[r]),
                    "user_recent_ads": [int(v) for v in self.recent_ads[lo:hi]],
                    "user_activity": float(self.user_activity[r]),
                },
                "candidates": [{
                    "ad_id": int(self.ad_id[e]),
                    "advertiser_id": int(self.advertiser_id[e]),
                    "ad_category": int(self.ad_category[e]),
                    "ad_ctr_prior": float(self.ad_ctr_prior[e]),
                    "ad_bid": float(self.ad_bid[e]),
                } for e in ex],
                "labels": [int(self.labels[e]) for e in ex],
            })
        return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 (wrapping arithmetic is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def _raw_ids(kind: int, index: np.ndarray) -> np.ndarray:
    """Large, scattered, positive int64 IDs < 2**62, as real entity IDs look (not 0..n-1)."""
    h = _mix64(index.astype(np.uint64) + np.uint64(kind << 40)) >> np.uint64(2)
    out: np.ndarray = np.maximum(h, np.uint64(1)).astype(np.int64)
    return out


def _power_law(rng: np.random.Generator, n: int, shape: float) -> np.ndarray:
    """Pareto popularity weights, normalized: a few entities get most of the traffic."""
    w: np.ndarray = rng.pareto(shape, n) + 1.0
    return w / float(w.sum())


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, _K))


@dataclass(frozen=True)
class _World:
    """Hidden state of one day. Per-entity arrays are indexed by entity index."""

    user_pop: np.ndarray
    user_geo: np.ndarray
    user_taste: np.ndarray
    user_bias: np.ndarray
    user_rate: np.ndarray
    geo_vec: np.ndarray
    geo_bias: np.ndarray
    cat_vec: np.ndarray
    adv_cat: np.ndarray
    adv_bias: np.ndarray
    ad: dict[str, np.ndarray]  # live ads: index (global, for raw IDs), pop, adv, vec, bias, ...


def _world(day: int) -> _World:
    rng = np.random.default_rng([WORLD_SEED, 0])
    geo_vec, geo_bias = _unit_rows(rng, _GEOS), rng.normal(0.0, 0.3, _GEOS)
    user_geo = rng.choice(_GEOS, _USERS, p=_power_law(rng, _GEOS, 1.0))
    taste = 0.6 * geo_vec[user_geo] + 0.8 * _unit_rows(rng, _USERS)
    rate = np.exp(rng.normal(_ACTIVITY_LOG_MEAN, 1.0, _USERS))
    user_bias = 0.3 * (np.log(rate) - _ACTIVITY_LOG_MEAN) + rng.normal(0.0, 0.3, _USERS)
    user_pop = _power_law(rng, _USERS, 1.5) * rate  # active users also send more requests
    cat_vec = _unit_rows(rng, _CATEGORIES)
    adv_cat = rng.choice(_CATEGORIES, _ADVERTISERS, p=_power_law(rng, _CATEGORIES, 1.2))
    adv_vec = cat_vec[adv_cat] + 0.7 * _unit_rows(rng, _ADVERTISERS)
    adv_bias = rng.normal(0.0, 0.4, _ADVERTISERS)
    adv_pop = _power_law(rng, _ADVERTISERS, 1.3)
    for d in range(1, day + 1):  # drift, one step per day, same steps for every caller
        drift = np.random.default_rng([WORLD_SEED, 100, d])
        moved = drift.random(_USERS) < 0.3
        angle = drift.uniform(1.0, 1.5, _USERS)[:, None]  # radians: a big change of taste
        other = _unit_rows(drift, _USERS)
        other *= np.linalg.norm(taste, axis=1, keepdims=True) / np.linalg.norm(
            other, axis=1, keepdims=True)
        taste = np.where(moved[:, None], np.cos(angle) * taste + np.sin(angle) * other, taste)
        adv_bias = adv_bias + drift.normal(0.0, 0.4, _ADVERTISERS)
    # Ads come in blocks with their own seed, so a block is the same ad set on every day.
    blocks = [_ad_block(b, adv_pop, adv_vec) for b in range(day, day + _LIVE_BLOCKS)]
    ad = {k: np.concatenate([blk[k] for blk in blocks]) for k in blocks[0]}
    ad["pop"] /= ad["pop"].sum()
    # The ad's historical CTR as the ads system knows it: a noisy estimate of its quality.
    ad["prior"] = 1.0 / (1.0 + np.exp(-(_BASE + 0.35 + ad["bias"] + adv_bias[ad["adv"]]
                                        + ad["prior_noise"])))
    return _World(user_pop / user_pop.sum(), user_geo, taste, user_bias, rate, geo_vec, geo_bias,
                  cat_vec, adv_cat, adv_bias, ad)


def _ad_block(block: int, adv_pop: np.ndarray, adv_vec: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([WORLD_SEED, 1, block])
    adv = rng.choice(len(adv_pop), _AD_BLOCK, p=adv_pop)
    return {
        "index": np.arange(block * _AD_BLOCK, (block + 1) * _AD_BLOCK, dtype=np.int64),
        "adv": adv.astype(np.int64),
        "pop": rng.pareto(1.2, _AD_BLOCK) + 1.0,
        "vec": (adv_vec[adv] + 0.7 * _unit_rows(rng, _AD_BLOCK)) / np.sqrt(2.0),
        "bias": rng.normal(0.0, 0.3, _AD_BLOCK),
        "bid": np.exp(rng.normal(0.3, 0.6, _AD_BLOCK)),
        "prior_noise": rng.normal(0.0, 0.25, _AD_BLOCK),
    }


def generate_log(num_requests: int, candidates_per_request: int, day: int, seed: int) -> ClickLog:
    """Draw `num_requests` requests of `candidates_per_request` ads each from day `day`'s world."""
    if num_requests < 0 or candidates_per_request < 1 or day < 0:
        raise ValueError("need num_requests >= 0, candidates_per_request >= 1, day >= 0")
    w = _world(day)
    rng = np.random.default_rng([seed, day, 7])
    r, c = num_requests, candidates_per_request
    users = rng.choice(_USERS, r, p=w.user_pop)
    geos = w.user_geo[users]
    activity = w.user_rate[users] * np.exp(rng.normal(0.0, 0.25, r))  # today's observed activity
    ads = rng.choice(len(w.ad["pop"]), r * c, p=w.ad["pop"])  # local indices into the live ads
    u, g, a = np.repeat(users, c), np.repeat(geos, c), ads
    adv = w.ad["adv"][a]
    cat = w.adv_cat[adv]
    bid = w.ad["bid"][a] * np.exp(rng.normal(0.0, 0.1, r * c))  # bids vary by auction
    logit = (
        _BASE + w.user_bias[u] + w.geo_bias[g] + w.ad["bias"][a] + w.adv_bias[adv]
        + _TASTE * np.einsum("ij,ij->i", w.user_taste[u], w.ad["vec"][a]) / np.sqrt(_K)
        + _GEO_CAT * np.einsum("ij,ij->i", w.geo_vec[g], w.cat_vec[cat]) / np.sqrt(_K)
        + _BID * np.log(bid)
    )
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(r * c) < prob).astype(np.int8)
    recent, offsets = _recent_ads(rng, w, users)
    return ClickLog(
        day=day, candidates_per_request=c,
        user_id=_raw_ids(1, users), user_geo=_raw_ids(2, geos),
        recent_ads=_raw_ids(5, w.ad["index"][recent]), recent_offsets=offsets,
        user_activity=np.round(activity, 3),
        ad_id=_raw_ids(5, w.ad["index"][a]), advertiser_id=_raw_ids(4, adv),
        ad_category=_raw_ids(3, cat), ad_ctr_prior=np.round(w.ad["prior"][a], 5),
        ad_bid=np.round(bid, 4), labels=labels, click_prob=prob,
    )


def _recent_ads(
    rng: np.random.Generator, w: _World, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each request's recently clicked ads: the user's favourites among popular ads.

    Gumbel-top-L over a popularity sample is sampling without replacement with
    probability ~ popularity * exp(affinity), i.e. what a user with this taste clicks.
    """
    r = len(users)
    lengths = np.minimum(rng.poisson(2.5 * np.log1p(w.user_rate[users])), _RECENT_MAX)
    chosen: list[np.ndarray] = []
    for lo in range(0, r, 4096):  # chunks bound the (chunk, pool, K) temporary
        u = users[lo:lo + 4096]
        pool = rng.choice(len(w.ad["pop"]), (len(u), _RECENT_POOL), p=w.ad["pop"])
        score = _TASTE * np.einsum("ik,ijk->ij", w.user_taste[u], w.ad["vec"][pool]) / np.sqrt(_K)
        score += w.ad["bias"][pool] + rng.gumbel(size=pool.shape)
        order = np.take_along_axis(pool, np.argsort(-score, axis=1), axis=1)
        keep = np.arange(_RECENT_POOL)[None, :] < lengths[lo:lo + 4096, None]
        chosen.append(order[keep])  # row-major, so each request's ads stay together
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return values.astype(np.int64), offsets
