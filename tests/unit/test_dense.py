"""The dense-architecture registry and its safetensors weight files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelpack import dense
from modelpack.dense import build_dense, load_dense, register_architecture, save_dense

CONFIG: dict[str, object] = {
    "num_sparse": 3, "embedding_dim": 4, "num_dense": 2,
    "cross_layers": 2, "cross_rank": 3, "mlp_dims": [8, 4],
}


def _inputs(batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 4, generator=g), torch.randn(batch, 2, generator=g)


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_dense("dcn_v2", CONFIG).eval()
    path = tmp_path / "dense.safetensors"
    save_dense(model, path)
    loaded = load_dense(path, "dcn_v2", CONFIG)
    sparse, dense_x = _inputs()
    with torch.no_grad():
        want, got = model(sparse, dense_x), loaded(sparse, dense_x)
    assert got.shape == (5,)
    assert torch.equal(want, got)
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["dense.safetensors"]  # no temp file left


def test_config_variants_build_and_run() -> None:
    variants: list[dict[str, object]] = [{"cross_layers": 0}, {"mlp_dims": []}, {"num_dense": 0}]
    for extra in variants:
        model = build_dense("dcn_v2", {**CONFIG, **extra})
        sparse, dense_x = _inputs()
        if extra.get("num_dense") == 0:
            dense_x = dense_x[:, :0]
        assert model(sparse, dense_x).shape == (5,)


def test_unknown_architecture_names_it_and_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown dense architecture 'transformer'.*dcn_v2"):
        build_dense("transformer", CONFIG)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"cross_rank": 0}, "cross_rank"),
        ({"num_sparse": "3"}, "num_sparse"),
        ({"cross_layers": True}, "cross_layers"),
        ({"mlp_dims": [8, 0]}, "mlp_dims"),
        ({"mlp_dims": 8}, "mlp_dims"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_bad_config_names_the_key(change: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=repr(key)):
        build_dense("dcn_v2", {**CONFIG, **change})


def test_missing_config_key_is_named() -> None:
    config = {k: v for k, v in CONFIG.items() if k != "embedding_dim"}
    with pytest.raises(ValueError, match="missing key 'embedding_dim'"):
        build_dense("dcn_v2", config)


def test_wrong_input_shapes_are_refused() -> None:
    model = build_dense("dcn_v2", CONFIG)
    sparse, dense_x = _inputs()
    with pytest.raises(ValueError, match="sparse input"):
        model(sparse[:, :2], dense_x)
    with pytest.raises(ValueError, match="dense input"):
        model(sparse, dense_x[:, :1])


def test_shape_mismatch_file_names_weight_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "dense.safetensors"
    save_dense(build_dense("dcn_v2", {**CONFIG, "cross_rank": 2}), path)
    with pytest.raises(ValueError, match=r"'cross\.0\.u\.weight' has shape \(\d+, 2\).*needs"):
        load_dense(path, "dcn_v2", CONFIG)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "dense.safetensors"
    save_dense(build_dense("dcn_v2", CONFIG), path)
    tensors = load_file(str(path))
    missing = dict(tensors)
    del missing["head.bias"]
    save_file(missing, str(path))
    with pytest.raises(ValueError, match=r"missing weight 'head\.bias'"):
        load_dense(path, "dcn_v2", CONFIG)
    save_file({**tensors, "extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"unexpected weight 'extra\.weight'"):
        load_dense(path, "dcn_v2", CONFIG)
    save_file({**tensors, "head.bias": torch.zeros(1, dtype=torch.int64)}, str(path))
    with pytest.raises(ValueError, match=r"'head\.bias' has dtype"):
        load_dense(path, "dcn_v2", CONFIG)


def test_loader_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("the dense loader must never unpickle")

    model = build_dense("dcn_v2", CONFIG)
    good = tmp_path / "dense.safetensors"
    save_dense(model, good)
    pickled = tmp_path / "dense.pt"
    torch.save(model.state_dict(), pickled)
    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    load_dense(good, "dcn_v2", CONFIG)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_dense(pickled, "dcn_v2", CONFIG)  # a torch.save pickle is refused, not executed
    source = Path(dense.__file__).read_text()
    assert "torch.load(" not in source and "import pickle" not in source


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("dcn_v2")(lambda config: torch.nn.Identity())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = build_dense("dcn_v2", CONFIG).eval()
    sparse, dense_x = _inputs()
    with torch.no_grad():
        want = model(sparse, dense_x)
        got = model.cuda()(sparse.cuda(), dense_x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
