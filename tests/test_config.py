from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_tools.pack import PrepareConfig
from slm_assist.core.config import load_config, parse_overrides, save_config
from slm_assist.core.errors import ConfigError
from slm_assist.salt.recipe import RunConfig

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"seed": 3, "train": {"max_steps": 50, "micro_batch_size": 2}})
    top = write(tmp_path / "top.yaml", {"base": "base.yaml", "train": {"max_steps": 70}, "model": {"hidden_size": 64}})
    cfg = load_config(RunConfig, top, ["train.micro_batch_size=5", "optim.lr=0.5", "run_dir=x"])
    assert cfg.seed == 3  # from base
    assert cfg.train.max_steps == 70  # top overrides base
    assert cfg.train.micro_batch_size == 5  # CLI overrides both
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == RunConfig().model.num_layers  # merged per key
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert load_config(RunConfig, None, ["optim.lr=6e-4"]).optim.lr == 6e-4  # YAML 1.1 reads this as a string
    assert cfg.run_dir == "x"


def test_override_parsing():
    assert parse_overrides(["a.b=3", "a.c=x", "d=[1, 2]", "e=true", "f="]) == {
        "a": {"b": 3, "c": "x"}, "d": [1, 2], "e": True, "f": ""}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["novalue"])


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"max_stepz": 5}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown config key 'train\.max_stepz'.*max_steps"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match=r"unknown config key 'nope'"):
        load_config(RunConfig, None, ["nope=1"])


@pytest.mark.parametrize("override, pattern", [
    ("train.max_steps=abc", r"train\.max_steps: expected an integer, got 'abc'"),
    ("optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
    ("train.max_steps=0", r"train\.max_steps: expected > 0, got 0"),
    ("train.dtype=fp16", r"train\.dtype: expected one of 'bf16', 'fp32', got 'fp16'"),
    ("train.zero_stage=4", r"train\.zero_stage: expected 0, 1, 2 or 3, got 4"),
    ("optim.lr=-1", r"optim\.lr: expected > 0, got -1"),
    ("model=3", r"model: expected a mapping"),
    ("train.activation_checkpointing=1", r"expected true or false"),
    ("model.num_heads=3", r"model\.hidden_size: expected a multiple of num_heads=3"),
])
def test_bad_values_name_key_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(RunConfig, None, [override])


def test_deepspeed_launcher_local_rank_is_dropped():
    from slm_assist.core.config import split_argv

    assert split_argv(["--local_rank=1", "c.yaml", "a=1"], "u") == ("c.yaml", ["a=1"])
    assert split_argv(["c.yaml", "--local_rank", "0", "a=1"], "u") == ("c.yaml", ["a=1"])
    with pytest.raises(ConfigError, match="usage: u"):
        split_argv(["a=1"], "u")


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(RunConfig, tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, REPO / "configs/demo/slm.yaml", ["train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg


def _entry_point_configs():
    from data_tools.score import ScoreConfig
    from data_tools.select import SelectConfig

    return [PrepareConfig, RunConfig, ScoreConfig, SelectConfig]


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_yaml_parses(path):
    """Each shipped YAML is a valid config of exactly one entry point."""
    parsed = []
    for cls in _entry_point_configs():
        try:
            parsed.append(load_config(cls, REPO / path))
        except ConfigError:
            pass
    assert len(parsed) == 1, f"{path} parses as {len(parsed)} config kinds"


def test_shipped_configs_exist():
    assert len(list((REPO / "configs").rglob("*.yaml"))) >= 3
