"""`--help` on the config-driven entry points: exit 0, usage, every config key with its type, default and
attribute docstring (core/config.py `config_help` / `parse_cli`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, get_type_hints

import pytest

from data_tools.pack import PrepareConfig
from data_tools.score import ScoreConfig
from data_tools.select import SelectConfig
from slm_assist.compress.stages import CompressConfig
from slm_assist.core.config import config_help, parse_cli
from slm_assist.core.errors import ConfigError
from slm_assist.salt.recipe import RunConfig

from .conftest import run_module

# module, config class, a docstring it must show, a (key, type, default) line it must show
ENTRY_POINTS = [
    ("slm_assist.train", RunConfig, "Optimizer steps in the run", "train.max_steps: int = 1000"),
    ("data_tools.pack", PrepareConfig, "Fraction of *documents* held out", "pack.val_fraction: float = 0.02"),
    ("data_tools.tokenizer", PrepareConfig, "Seeds the document-level split", "pack.seq_len: int = 256"),
    ("data_tools.score", ScoreConfig, "A packed dataset directory", 'data: str = "runs/demo/data"'),
    ("data_tools.select", SelectConfig, "Kept fraction of the scorable sequences", "band: list[float] = []"),
    ("slm_assist.compress", CompressConfig, "Whom the stage distils from",
     "stages: list[StageConfig] = 5 items (finetune, gd, ged, tad, tsd)"),
]


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (nested dataclass fields are sections)."""
    hints, keys = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{name}.")
        elif dataclasses.is_dataclass(item):  # a list of sections: its items' keys as name[*].key
            keys += [name, *leaf_keys(item, f"{name}[*].")]
        else:
            keys.append(name)
    return keys


def assert_only_warnings(stderr: str) -> None:
    """stderr may hold library warnings (`file:line: SomeWarning: ...` + the indented source line), nothing else."""
    for line in stderr.splitlines():
        assert not line.strip() or "Warning" in line or line.startswith((" ", "\t")), stderr


@pytest.mark.parametrize("module, cls, doc, typed", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_help_lists_every_key(module, cls, doc, typed):
    res = run_module(module, ["--help"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_only_warnings(res.stderr)
    out = res.stdout
    assert out.startswith(f"usage: python -m {module} CONFIG [key=value ...]\n")
    lines = [line.strip() for line in out.splitlines()]
    for key in leaf_keys(cls):
        assert any(line.startswith(f"{key}: ") for line in lines), f"{key} missing from --help of {module}"
    assert doc in " ".join(out.split())  # docstrings are reflowed, so compare with whitespace collapsed
    assert typed in lines
    assert f"python -m {module} configs/demo/" in out  # the example


def test_help_shows_sections_and_inherited_keys():
    out = run_module("slm_assist.train", ["-h"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[distill]" in out.stdout and "[distill.schedule]" in out.stdout  # RunConfig adds distill to TrainerConfig
    assert 'distill.schedule.kind: constant|step|linear|linear_ratio|wsd = "step"' in out.stdout
    assert "w: the KD weight during the KD phase" in out.stdout


def test_no_arguments_is_still_a_usage_error():
    res = run_module("data_tools.select", [], timeout=300)
    assert res.returncode == 2
    assert "usage: python -m data_tools.select" in res.stderr and res.stdout == ""


@dataclass
class _Inner:
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    limit: int | None = None


@dataclass
class _Tiny:
    name: str = ""
    """The name: a long docstring that goes on and on, so that config_help has to reflow it onto a second
    line at one hundred columns."""
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    flag: bool = True
    inner: _Inner = field(default_factory=_Inner)
    """The inner section."""


@dataclass
class _TinyRun(_Tiny):
    extra: dict = field(default_factory=dict)
    """Added by a subclass."""


def test_config_help_rendering():
    text = config_help(_TinyRun, "tiny CONFIG [key=value ...]", "Do tiny things.\n\nNot this paragraph.",
                       "tiny c.yaml inner.mode=b")
    assert text == """\
usage: tiny CONFIG [key=value ...]

Do tiny things.

CONFIG is a YAML file (a top-level `base: other.yaml` is merged in underneath); each key=value
override sets a dotted key (its value read as YAML) and wins over the file.

config keys (key: type = default):
  name: str = ""
      The name: a long docstring that goes on and on, so that config_help has to reflow it onto a
      second line at one hundred columns.
  sizes: list[int] = [1, 2]
  flag: bool = true
  extra: dict = {}
      Added by a subclass.

[inner]
  The inner section.
  inner.mode: a|b = "a"
      Which mode.
  inner.limit: int or null = null

example:
  tiny c.yaml inner.mode=b
"""


def test_parse_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(["c.yaml", "--help"], _Tiny, "tiny CONFIG", description="Tiny.")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tiny CONFIG\n\nTiny.\n")
    with pytest.raises(ConfigError, match="usage: tiny CONFIG"):
        parse_cli([], _Tiny, "tiny CONFIG")
    (tmp_path / "c.yaml").write_text("name: x\n")
    cfg = parse_cli([str(tmp_path / "c.yaml"), "inner.limit=3"], _Tiny, "tiny CONFIG")
    assert (cfg.name, cfg.inner.limit, cfg.sizes) == ("x", 3, [1, 2])
