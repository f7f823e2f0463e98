"""Config files and option names checked before jsonargparse sees them: every problem as one short block.

jsonargparse reports an unknown key after a page of usage, without the file or a suggestion, and a YAML syntax
error as `"<unicode string>", line 2`. Here a YAML file is parsed first (a syntax error names the file, line and
column), then every key of every file and every `--a.b.c` option is walked against the typed arguments
(dataclasses, their optional and dict-of-dataclass fields): an unknown key is reported with the file, the key and
the nearest valid key ("did you mean `warmup.epochs`?"), all at once, as a ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rose_pl.errors import ConfigError

_ANY = object()
"""A field whose value is free-form (a dict of anything): its keys are not checked."""


def _nested(tp: Any) -> tuple[str, Any] | None:
    """("dataclass", cls) or ("map", cls) when a field holds a dataclass (maybe optional) or a dict of them."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "dataclass", tp
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _nested(arg)
            if found is not None:
                return found
        return None
    if origin is dict:
        args = typing.get_args(tp)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return "map", args[1]
    return None


def fields_of(cls: type) -> dict[str, Any]:
    """{field name: its resolved type} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the dataclass accepts (maps of dataclasses shown with `<name>`)."""
    keys = []
    for name, tp in fields_of(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        nested = _nested(tp)
        if nested is not None:
            kind, inner = nested
            keys += all_keys(inner, f"{key}.<name>." if kind == "map" else f"{key}.")
    return keys


def _suggest(dotted: str, valid: list[str], everywhere: list[str]) -> str:
    """The nearest valid key at the same level, or the groups that have an option of that name."""
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    key = dotted.rsplit(".", 1)[-1]
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; `{key}` is an option of {', '.join(f'`{k}`' for k in elsewhere[:3])}"
    return ""


def unknown_keys(data: Any, cls: type, prefix: str = "", everywhere: list[str] | None = None) -> list[str]:
    """`key: not an option ...` for every key of `data` (a parsed YAML mapping) that `cls` does not accept."""
    everywhere = all_keys(cls) if everywhere is None else everywhere
    if not isinstance(data, dict):
        return []
    fields = fields_of(cls)
    problems = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"`{dotted}` is not an option{_suggest(dotted, [prefix + f for f in fields], everywhere)}")
            continue
        nested = _nested(fields[key])
        if nested is None or value is None:
            continue
        kind, inner = nested
        if kind == "dataclass":
            problems += unknown_keys(value, inner, f"{dotted}.", everywhere)
        elif isinstance(value, dict):
            for name, item in value.items():
                problems += unknown_keys(item, inner, f"{dotted}.{name}.", everywhere)
    return problems


def _option_problem(parts: list[str], cls: type, prefix: str = "", everywhere: list[str] | None = None) -> str | None:
    """The problem with option `--<prefix><parts>` (None when cls accepts it)."""
    everywhere = all_keys(cls) if everywhere is None else everywhere
    if not parts:
        return None
    fields = fields_of(cls)
    head, rest = parts[0], parts[1:]
    if head not in fields:
        dotted = prefix + ".".join(parts)
        return f"`--{dotted}` is not an option{_suggest(prefix + head, [prefix + f for f in fields], everywhere)}"
    nested = _nested(fields[head])
    if nested is None or not rest:
        return None
    kind, inner = nested
    if kind == "map":  # the entry's name, then its keys
        return _option_problem(rest[1:], inner, f"{prefix}{head}.{rest[0]}.", everywhere)
    return _option_problem(rest, inner, f"{prefix}{head}.", everywhere)


def load_yaml(path: str | Path) -> Any:
    """A YAML file parsed, or a ConfigError naming the file, line and column of a syntax error."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def check_argv(argv: list[str], cls: type, flags: tuple[str, ...] = ()) -> None:
    """Check every `--config FILE` and `--key value` of `argv` against dataclass `cls` (and the extra `flags`);
    raise one ConfigError listing every problem."""
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            name, _, inline = token[2:].partition("=")
            if name == "config":
                file = inline or (argv[i + 1] if i + 1 < len(argv) else None)
                if file is None:
                    problems.append("--config needs a file")
                else:
                    try:
                        data = load_yaml(file)
                        if data is not None and not isinstance(data, dict):
                            problems.append(f"{file}: expected a mapping of options, got {type(data).__name__}")
                        else:
                            problems += [f"{file}: {p}" for p in unknown_keys(data or {}, cls)]
                    except ConfigError as e:
                        problems += e.problems
            elif name not in flags and name not in ("help", "print_config"):
                problem = _option_problem(name.split("."), cls)
                if problem:
                    problems.append(problem)
        i += 1
    if problems:
        raise ConfigError(problems)
