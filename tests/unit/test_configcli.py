"""modelpack.configcli: options derived from config dataclasses, their docstrings as help."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import deploy_controller.__main__ as controller_main
import embedding_server.__main__ as embedding_main
import ranker_server.__main__ as ranker_main
from deploy_controller.config import ControllerConfig
from deploy_controller.gates import GateConfig
from embedding_server.config import ServerConfig
from modelpack.configcli import (
    ConfigFlags,
    Flag,
    field_docs,
    require_at_least,
    require_path,
    require_port,
)
from ranker_server.config import RankerConfig

CONFIGS = [ServerConfig, RankerConfig, ControllerConfig, GateConfig]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Sample:
    """A config with one field of every kind the helper derives an option for."""

    path: Path
    """Where it lives (100% required)."""
    count: int = 3
    """How many."""
    ratio: float | None = None
    """An optional ratio."""
    mode: Literal["fast", "slow"] = "fast"
    """Which way."""
    color: Color = Color.RED
    """A colour."""
    shares: tuple[int, ...] = (5, 25, 100)
    """Percent steps."""
    verbose: bool = False
    """Say more."""
    eager: bool = True
    """Start at once."""
    names: tuple[str, ...] = ()
    """Repeated on the command line."""
    old_name_s: float = 1.5
    """Kept under an older flag name."""


SAMPLE = ConfigFlags(Sample, env_prefix="SAMPLE_", flags={
    "names": Flag(repeat=True, metavar="NAME", convert=lambda vs: tuple(v.upper() for v in vs),
                  unparse=list),
    "old_name_s": Flag(name="--old-name"),
})


def _parse(argv: list[str]) -> Sample:
    p = argparse.ArgumentParser(prog="sample")
    SAMPLE.add_to(p)
    return Sample(**SAMPLE.values(p.parse_args(argv)))


def _squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize(("main", "cls", "skip"), [
    (embedding_main.main, ServerConfig, {"admin_token", "peer_dir"}),
    (ranker_main.main, RankerConfig, set()),
    (controller_main.main, ControllerConfig, {"gates", "crash_at"}),
    (controller_main.main, GateConfig, set()),
], ids=["embedding-server", "ranker-server", "deploy-controller", "deploy-controller-gates"])
def test_help_shows_every_field_docstring(main: Callable[[list[str]], int], cls: type,
                                          skip: set[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = _squash(capsys.readouterr().out)
    assert "--peer-dir" not in shown, "internal flags stay out of --help"
    for name, doc in field_docs(cls).items():
        if name not in skip:
            assert _squash(doc) in shown, f"--help lacks {cls.__name__}.{name}: {doc!r}"


def test_options_follow_the_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAMPLE_COUNT", raising=False)
    s = _parse(["--path", str(tmp_path)])
    assert s == Sample(path=tmp_path)
    s = _parse(["--path", "p", "--count", "7", "--ratio", "0.5", "--mode", "slow", "--color", "blue",
                "--shares", "10,100", "--verbose", "--no-eager", "--names", "a", "--names", "b",
                "--old-name", "2"])
    assert s == Sample(path=Path("p"), count=7, ratio=0.5, mode="slow", color=Color.BLUE,
                       shares=(10, 100), verbose=True, eager=False, names=("A", "B"), old_name_s=2.0)


@pytest.mark.parametrize("sample", [
    Sample(path=Path("p")),
    Sample(path=Path("p"), count=0, ratio=0.25, mode="slow", color=Color.BLUE, shares=(),
           verbose=True, eager=False, names=("A", "B"), old_name_s=0.0),
])
def test_argv_parses_back_to_the_same_config(sample: Sample, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAMPLE_COUNT", "SAMPLE_NO_EAGER", "SAMPLE_SHARES"):
        monkeypatch.delenv(name, raising=False)
    assert _parse(SAMPLE.argv(sample)) == sample


@pytest.mark.parametrize("argv", [[], ["--path", "p", "--mode", "medium"],
                                  ["--path", "p", "--color", "green"], ["--path", "p", "--count", "x"],
                                  ["--path", "p", "--old-name-s", "2"]])
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _parse(argv)
    assert done.value.code == 2 and "error:" in capsys.readouterr().err


def test_environment_gives_defaults_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMPLE_COUNT", "9")
    monkeypatch.setenv("SAMPLE_NO_EAGER", "true")
    monkeypatch.setenv("SAMPLE_SHARES", "1,2")
    s = _parse(["--path", "p"])
    assert (s.count, s.eager, s.shares) == (9, False, (1, 2))
    assert _parse(["--path", "p", "--count", "4"]).count == 4


def test_help_shows_defaults_and_choices() -> None:
    p = argparse.ArgumentParser(prog="sample")
    SAMPLE.add_to(p)
    text = " ".join(p.format_help().split())
    assert "Where it lives (100% required)." in text
    assert "How many. (default: 3)" in text and "Percent steps. (default: 5,25,100)" in text
    assert "{fast,slow}" in text and "{red,blue}" in text and "(default: red)" in text
    assert "--no-eager" in text and "--old-name OLD_NAME" in text and "--names NAME" in text


def test_a_field_type_without_a_conversion_is_refused() -> None:
    @dataclass
    class Odd:
        pairs: dict[str, int] = dataclasses.field(default_factory=dict)
        """Not a command-line shape."""

    with pytest.raises(TypeError, match=r"Odd\.pairs"):
        ConfigFlags(Odd).add_to(argparse.ArgumentParser())


def test_shared_checks_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--workers must be >= 1, got 0"):
        require_at_least(ValueError, 1, {"--shard": 2, "--workers": 0})
    with pytest.raises(ValueError, match=r"drain must be > 0, got 0\.0"):
        require_at_least(ValueError, 0, {"drain": 0.0}, strictly=True)
    require_at_least(ValueError, 0, {"grace": 0.0})
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\], got 70000"):
        require_port(ValueError, "port", 70000)
    require_port(ValueError, "port", None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"store .* is not a directory"):
        require_path(ValueError, "store", tmp_path / "f", "dir")
    with pytest.raises(ValueError, match=r"token .* is not a file"):
        require_path(ValueError, "token", tmp_path, "file")
    require_path(ValueError, "token", None, "file")
    require_path(ValueError, "token", tmp_path / "f", "file")
