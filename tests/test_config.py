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
    from slm_assist.compress.stages import CompressConfig

    return [PrepareConfig, RunConfig, ScoreConfig, SelectConfig, CompressConfig]


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


@pytest.mark.parametrize("cls, overrides, message", [
    ("run", ["distill.data.selection=sel.npy"], r"distill\.data\.selection='sel\.npy' has no effect with "
                                                 r"source\.kind=none"),
    ("run", ["distill.gate.topk=5"], r"gate\.topk=5 has no effect with source\.kind=none"),
    ("run", ["distill.schedule.weight=0.5"], r"schedule\.weight=0\.5 has no effect with source\.kind=none"),
    ("run", ["distill.source.kind=teacher", "distill.source.teachers=[t]", "distill.loss.beta=0.3"],
     r"distill\.loss\.beta=0\.3 has no effect with kind=forward_kl"),
    ("run", ["distill.source.kind=teacher", "distill.source.teachers=[t]", "distill.source.caches=[c]"],
     r"distill\.source\.caches=\['c'\] has no effect with kind=teacher"),
    ("run", ["distill.teacher=t"], r"'distill\.teacher' is now distill\.source\.teachers \(with "
                                   r"distill\.source\.kind=teacher\)"),
    ("run", ["distill.source.kind=teacher", "distill.source.teachers=[t]", "distill.handover.teacher=h"],
     r"distill\.handover\.teacher='h' has no effect with every=0"),
    ("score", ["cache.k=5"], r"cache\.k=5 has no effect with cache\.mode=none"),
    ("score", ["cache.mode=top_k", "cache.samples=4"], r"cache\.samples=4 has no effect with cache\.mode=top_k"),
    ("score", ["cache.indices=i.npy"], r"cache\.indices='i\.npy' has no effect with cache\.mode=none"),
    ("select", ["seed=3"], r"seed=3 has no effect with policy=salt_ds"),
    ("select", ["policy=random", "band=[10, 90]"], r"band=\[10\.0, 90\.0\] has no effect with policy=random"),
    ("select", ["ppl_band=low"], r"ppl_band='low' has no effect with policy=salt_ds"),
])
def test_a_setting_without_effect_is_an_error(cls, overrides, message):
    from data_tools.score import ScoreConfig
    from data_tools.select import SelectConfig

    klass = {"run": RunConfig, "score": ScoreConfig, "select": SelectConfig}[cls]
    with pytest.raises(ConfigError, match=message):
        load_config(klass, None, overrides)
    base = {"run": ["distill.source.kind=teacher", "distill.source.teachers=[t]", "distill.loss.kind=jsd",
                    "distill.loss.beta=0.3"], "score": ["cache.mode=sampled",
            "cache.samples=4", "cache.seed=2"], "select": ["policy=random", "seed=3"]}[cls]
    load_config(klass, None, base)  # the same kind of setting where it matters is fine
