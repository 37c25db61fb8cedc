"""Typed run configs: dataclass defaults -> YAML file (with optional `base:` includes) -> dotted CLI overrides.

Every component owns a dataclass for its section; a run config composes them. Unknown keys and values of the
wrong type are errors that name the key, the value and the file they came from.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from slm_assist.core.errors import ConfigError
from slm_assist.core.files import atomic_write_text

T = TypeVar("T")

PATH = "path"
PathSetting = Annotated[str, PATH]
"""A setting that names a file or directory the run reads (a dataset, a model, scores, a selection): compared by
content on resume (core/relaunch.py) and recorded relative to the run in exported metadata."""


def path_settings(cls: type, prefix: str = "") -> list[str]:
    """The dotted names of a config class's PathSetting fields (and lists of them), through its sections."""
    out = []
    for name, tp in get_type_hints(cls, include_extras=True).items():
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else tp
        if get_origin(item) is Annotated and PATH in get_args(item)[1:]:
            out.append(prefix + name)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += path_settings(tp, f"{prefix}{name}.")
    return out


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; a top-level `base: other.yaml` (relative to this file) is merged in underneath."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` include ({' -> '.join(map(str, seen + (path,)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, _load_yaml(path.parent / b, seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `top` wins. Mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`a.b=3 c=x` -> {"a": {"b": 3}, "c": "x"}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return tree


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` (int/float/str/bool, Optional, Literal, list, dict, dataclass)."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"a mapping for section {_type_name(tp)}")
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `6e-4` as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in a config class, not user input


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    moved = getattr(cls, "MOVED", {})  # a section's settings that moved: the error names the new key
    if unknown and unknown[0] in moved:
        raise ConfigError(f"{source}: config key '{_join(prefix, unknown[0])}' is now {moved[unknown[0]]}")
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown config key '{_join(prefix, unknown[0])}' in {where}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k), source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks name the field; add the prefix and source
        raise ConfigError(f"{source}: {_join(prefix, str(e))}" if prefix else f"{source}: {e}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Resolve a config: dataclass defaults <- YAML file <- dotted overrides. Errors name key, value and source."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = _load_yaml(Path(path))
        source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(list(overrides)))
        source = f"{source} + overrides"
    return _build(cls, data, "", source)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def split_argv(argv: typing.Sequence[str], usage: str) -> tuple[str, list[str]]:
    """`CONFIG [key=value ...]` -> (config path, overrides). The deepspeed launcher's `--local_rank=N` is dropped:
    LOCAL_RANK in the environment carries the same information."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--local_rank"):
            skip = a == "--local_rank"
        else:
            args.append(a)
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        raise ConfigError(f"usage: {usage}")
    bad = [a for a in args[1:] if "=" not in a]
    if bad:
        raise ConfigError(f"argument {bad[0]!r} is not an override of the form key=value; usage: {usage}")
    return args[0], args[1:]


def parse_cli(argv: typing.Sequence[str], cls: type[T], usage: str, *, description: str | None = "",
              example: str = "") -> T:
    """An entry point's `CONFIG [key=value ...]` -> its config. `-h`/`--help` anywhere prints `config_help` to
    stdout and exits 0 (a bare `--help` can never be an override, so it cannot shadow one)."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cls, usage, description, example), end="", flush=True)
        sys.exit(0)
    path, overrides = split_argv(argv, usage)
    return load_config(cls, path, overrides)


def config_help(cls: type, usage: str, description: str | None = "", example: str = "") -> str:
    """The `--help` text of a config-driven command: usage, the first paragraph of `description` (a module
    docstring as is), every config key of `cls` by section (dotted name, type, default, attribute docstring),
    and an example command line."""
    paragraph = (description or "").strip().split("\n\n")[0]
    out = [f"usage: {usage}", ""]
    if paragraph:
        out += _wrap(paragraph, "") + [""]
    out += _wrap("CONFIG is a YAML file (a top-level `base: other.yaml` is merged in underneath); each key=value "
                 "override sets a dotted key (its value read as YAML) and wins over the file.", "")
    out += ["", "config keys (key: type = default):"]
    out += _help_section(cls, "", "")
    if example:
        out += ["", "example:", f"  {example}"]
    return "\n".join(out) + "\n"


def _help_section(cls: type, prefix: str, doc: str) -> list[str]:
    """Lines for one section: its own keys first, then each nested section (a dataclass field) in field order."""
    hints, docs = get_type_hints(cls), _field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    leaves = [f for f in fields if not _is_section(hints[f.name])]
    lines: list[str] = []
    if prefix:
        lines += ["", f"[{prefix}]"] + _wrap(doc, "  ")
    for f in leaves:
        lines.append(f"  {_join(prefix, f.name)}: {_type_label(hints[f.name])} = {_default_label(f)}")
        lines += _wrap(docs.get(f.name, ""), "      ")
    for f in fields:
        if _is_section(hints[f.name]):
            lines += _help_section(hints[f.name], _join(prefix, f.name), docs.get(f.name, ""))
        elif _is_section(item := _list_item(hints[f.name])):  # a list of sections: the keys of one item
            lines += _help_section(item, _join(prefix, f.name) + "[*]", f"each item of {_join(prefix, f.name)}")
    return lines


def _list_item(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) are not kept at runtime: read them from the
    source of every class in the MRO, a subclass's winning for a redeclared field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (e.g. a frozen app): the keys still get listed
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _wrap(doc: str, indent: str) -> list[str]:
    """Reflow a docstring to 100 columns, keeping its paragraphs."""
    return [line for para in doc.split("\n\n") if para.strip()
            for line in textwrap.wrap(" ".join(para.split()), 100, initial_indent=indent, subsequent_indent=indent)]


def _type_label(tp: Any) -> str:
    """An annotation as a user writes the value: `a|b` for a Literal, `X or null` for an Optional."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_label(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_label(a) for a in args)}]" if args else name
    if tp is Any:
        return "any"
    return "..." if tp is Ellipsis else _type_name(tp)


def _default_label(f: dataclasses.Field) -> str:
    """The default in the YAML/JSON spelling an override uses ("" for an empty string, true, null, [])."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):  # e.g. the default stage list
        names = [getattr(v, "name", None) for v in value]
        return f"{len(value)} items" + (f" ({', '.join(map(str, names))})" if all(names) else "")
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def non_defaults(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every setting of a config dataclass that differs from its default."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += non_defaults(value, f"{prefix}{f.name}.")
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                out.append((prefix + f.name, value))
    return out


def check_no_effect(cfg: Any, names: typing.Iterable[str] | None, when: str, prefix: str = "") -> None:
    """For __post_init__: the settings `names` (None = all) must keep their defaults, because `when` they would
    be silently ignored. A setting that has no effect is an error, not a no-op the saved config still records."""
    wanted = None if names is None else set(names)
    for name, value in non_defaults(cfg):
        if wanted is None or name.split(".")[0] in wanted:
            raise ConfigError(f"{prefix}{name}={value!r} has no effect {when}")


def record_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old there, new here` for every leaf that differs between two JSON-like records (what a saved record
    of settings says vs what this run asks for)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in record_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} here"]


def check(cond: bool, field: str, value: Any, expected: str) -> None:
    """Validation helper for __post_init__: raises ConfigError naming the field and the bad value."""
    if not cond:
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")
