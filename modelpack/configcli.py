"""Command-line options derived from a config dataclass, with its field docstrings as help.

Each server has one typed, frozen config dataclass whose fields carry a docstring under
them (the attribute-docstring convention vLLM derives its engine flags from).
`ConfigFlags` turns those fields into argparse options: `--field-name`, typed from the
annotation, the default shown, choices for `Literal` and `Enum`, `--flag` for a bool
that defaults to False and `--no-flag` for one that defaults to True. The help text is
therefore written once, next to the field. A `Flag` records the few places where an
option really differs: an older name kept for compatibility, a repeated option, a value
parsed after argparse so that its error is the config's own.

Also here: the range and path checks that every config's `validate()` shares.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal

_TRUE = ("1", "true", "yes")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Dataclass field name -> the docstring under it, whitespace collapsed (read once)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        assert isinstance(node, ast.ClassDef)
        for stmt, nxt in zip(node.body, node.body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in docs.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Flag:
    """Where one field's option differs from what its annotation and default give."""

    name: str = ""
    """The option's name when it is not --field-name (an older name kept for compatibility)."""
    default: str | None = None
    """The default as it is written on the command line (shown in --help, given to convert)."""
    convert: Callable[[Any], Any] | None = None
    """Parsed value -> field value, after argparse, so that it may raise the config's error."""
    repeat: bool = False
    """The option may be given several times; convert receives the list of values."""
    unparse: Callable[[Any], Any] | None = None
    """Field value -> its command-line text (a list of them for a repeated option): the
    inverse of convert, for ConfigFlags.argv."""
    metavar: str | None = None
    """The value's placeholder in --help."""
    hidden: bool = False
    """Internal: accepted but not listed in --help."""


@dataclasses.dataclass(frozen=True)
class _Option:
    field: str
    name: str
    dest: str
    negated: bool
    convert: Callable[[Any], Any] | None
    repeat: bool


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _items(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    return parse


def _shown(value: Any) -> str | None:
    """A default as the user would type it, or None when there is nothing to show."""
    if value is None or isinstance(value, bool) or value in ("", ()):
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
    """The options of one config dataclass: add them to a parser, read them back."""

    cls: type
    """The config dataclass; every field it does not skip becomes an option."""
    flags: Mapping[str, Flag] = dataclasses.field(default_factory=dict)
    """Field name -> how its option differs from the derived one."""
    skip: Collection[str] = ()
    """Fields that are no option (set another way, e.g. read from a file or nested)."""
    prefix: str = ""
    """Prepended to every option and dest: `gate-` gives --gate-min-requests for a nested config."""
    env_prefix: str = ""
    """When set, the environment variable env_prefix + DEST (e.g. RANKER_MAX_QUEUE) gives the
    default; a flag on the command line still wins."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add one option per field to parser."""
        hints = typing.get_type_hints(self.cls)
        docs = field_docs(self.cls)
        for f in dataclasses.fields(self.cls):
            if f.name in self.skip:
                continue
            over = self.flags.get(f.name, Flag())
            hint = _unwrap_optional(hints[f.name])
            default: Any = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            name, dest, negated = self._name(f.name, over, hint, default)
            kw: dict[str, Any] = {"dest": dest}
            if hint is bool and over.convert is None:
                kw["action"] = "store_true"
                default = False
            else:
                kw.update(self._typed(f.name, over, hint))
            if over.default is not None:
                default = over.default
            env = os.environ.get(self.env_prefix + dest.upper()) if self.env_prefix else None
            if env is not None:
                default = env.strip().lower() in _TRUE if kw.get("action") == "store_true" else env
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = None if over.repeat else default
            doc = docs.get(f.name, "")
            shown = None if negated or default is dataclasses.MISSING else _shown(default)
            text = doc if shown is None else f"{doc} (default: {shown})"
            kw["help"] = argparse.SUPPRESS if over.hidden else text.replace("%", "%%")
            parser.add_argument(name, **kw)

    def values(self, ns: argparse.Namespace) -> dict[str, Any]:
        """Field name -> value, from a namespace that parser.parse_args() returned."""
        out: dict[str, Any] = {}
        for o in self._options():
            value = getattr(ns, o.dest)
            if o.repeat and value is None:
                value = []
            if o.negated:
                value = not value
            out[o.field] = o.convert(value) if o.convert is not None else value
        return out

    def argv(self, config: Any) -> list[str]:
        """The command line that parses back to config's values (fields set to None left out)."""
        out: list[str] = []
        for o in self._options():
            value = getattr(config, o.field)
            unparse = self.flags.get(o.field, Flag()).unparse
            if unparse is not None:
                value = unparse(value)
            if value is None:
                continue
            if isinstance(value, bool) and o.convert is None:
                out += [o.name] if value != o.negated else []
            elif o.repeat:
                for item in value:
                    out += [o.name, str(item)]
            else:
                out += [o.name, _shown(value) or ""]
        return out

    def _name(self, field: str, over: Flag, hint: Any, default: Any) -> tuple[str, str, bool]:
        negated = hint is bool and default is True and over.convert is None
        base = ("no-" if negated else "") + self.prefix + field.replace("_", "-")
        name = over.name or "--" + base
        return name, name.lstrip("-").replace("-", "_"), negated

    def _typed(self, field: str, over: Flag, hint: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {"metavar": over.metavar} if over.metavar else {}
        if over.repeat:
            kw["action"] = "append"
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if over.convert is not None:
            kw["type"] = str
        elif origin is Literal:
            kw.update(type=type(args[0]), choices=list(args))
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            kw.update(type=hint, choices=list(hint), metavar=kw.get("metavar") or
                      "{" + ",".join(str(m.value) for m in hint) + "}")
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            kw.update(type=_items(args[0]), metavar=kw.get("metavar") or "V1,V2,...")
        elif hint in (int, float, str, Path):
            kw["type"] = hint
        else:
            raise TypeError(f"{self.cls.__name__}.{field}: {hint!r} needs a Flag with convert")
        return kw

    def _options(self) -> list[_Option]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.skip:
                continue
            over = self.flags.get(f.name, Flag())
            name, dest, negated = self._name(f.name, over, _unwrap_optional(hints[f.name]), f.default)
            out.append(_Option(f.name, name, dest, negated, over.convert, over.repeat))
        return out


def require_at_least(error: type[Exception], minimum: float, values: Mapping[str, float],
                     *, strictly: bool = False) -> None:
    """Raise error naming the first value below minimum (or not above it, when strictly)."""
    for name, value in values.items():
        if not (value > minimum if strictly else value >= minimum):
            raise error(f"{name} must be {'>' if strictly else '>='} {minimum:g}, got {value}")


def require_port(error: type[Exception], name: str, port: int | None) -> None:
    """Raise error unless port is None or a TCP port number (0 = any free port)."""
    if port is not None and not 0 <= port <= 65535:
        raise error(f"{name} must be in [0, 65535], got {port}")


def require_path(error: type[Exception], name: str, path: Path | None,
                 kind: Literal["dir", "file"]) -> None:
    """Raise error unless path is None or an existing directory (or file)."""
    if path is None:
        return
    ok = Path(path).is_dir() if kind == "dir" else Path(path).is_file()
    if not ok:
        raise error(f"{name} {str(path)!r} is not a {'directory' if kind == 'dir' else 'file'}")
