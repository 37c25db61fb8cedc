"""What a launch is, for comparing it with the one that made a checkpoint: its settings flattened to dotted keys,
the content fingerprints of every input a setting names, the rules of what may change on resume, and the one
comparison that lists every difference and refuses those that change the math (core/run_dir.py applies it).
Exported metadata names inputs relative to the run directory (`relative_to_run`), never by absolute path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_assist.core.errors import UserError
from slm_assist.core.files import file_sha256
from slm_assist.core.model_dir import CONFIG as MODEL_CONFIG
from slm_assist.core.model_dir import ModelDir
from slm_assist.core.selection import INDEX


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _under(key: str, patterns: Iterable[str]) -> bool:
    """`key` is one of `patterns` or inside a section one of them names (`optim` covers `optim.lr`)."""
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in patterns)


def artifact_fingerprint(path: str | Path) -> str | None:
    """What a path setting points at, by content: a model directory by its weights, a packed dataset or a scoring
    output by its manifest, a selection by its index, a file by its bytes; None when it is none of these (or gone)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)[:16]
    if not p.is_dir():
        return None
    for marker in ("manifest.json", INDEX):
        if (p / marker).is_file():
            return file_sha256(p / marker)[:16]
    if (p / MODEL_CONFIG).is_file():
        return ModelDir(p).fingerprint()
    return None


def input_fingerprints(config: dict[str, Any], paths: Iterable[str],
                       extra: dict[str, str] | None = None) -> dict[str, str]:
    """{setting: fingerprint} of the path settings `paths` of `config` (core.config.path_settings; a list item by
    item, as `key[i]`) that name an existing artifact, plus `extra` inputs that are not settings (a compress
    stage's teacher). Only declared paths: a value like "cosine" is never taken for a file of that name."""
    flat = flatten(config)
    items = [(k, flat[k]) for k in paths if k in flat] + list((extra or {}).items())
    out = {}
    for key, value in items:
        for i, v in list(enumerate(value)) if isinstance(value, list) else [(None, value)]:
            if isinstance(v, str) and v:
                fp = artifact_fingerprint(v)
                if fp is not None:
                    out[key if i is None else f"{key}[{i}]"] = fp
    return out


def relative_to_run(config: dict[str, Any], keys: Iterable[str], run_dir: Path) -> dict[str, Any]:
    """A copy of `config` whose settings `keys` (dotted; `key[i]` for list items) name their paths relative to
    `run_dir`, so that exported metadata carries no absolute local path; `RunDir.resolve` reads them back."""
    out = json.loads(json.dumps(config, default=str))
    base = Path(run_dir).absolute()
    for key in keys:
        m = re.fullmatch(r"(.+)\[(\d+)\]", key)
        path, index = (m.group(1), int(m.group(2))) if m else (key, None)
        *sections, leaf = path.split(".")
        node = out
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        if index is None:
            node[leaf] = os.path.relpath(Path(node[leaf]).absolute(), base)
        else:
            node[leaf][index] = os.path.relpath(Path(node[leaf][index]).absolute(), base)
    return out


@dataclass(frozen=True)
class RelaunchRules:
    """How the settings of a relaunch may differ from those that made the checkpoint it resumes."""

    harmless: tuple[str, ...]
    """Settings (dotted, or whole sections) whose change cannot change the math: cadences, threads, kernels."""
    extendable: tuple[str, ...] = ()
    """Accepted when larger, with a note of what follows (a longer run re-spans the schedules that depend on its
    length); a smaller value is refused like any other change."""
    fixed: tuple[str, ...] = ()
    """Refused even with the override: the checkpoint's tensors have the old value's shapes."""
    override: str = "checkpoint.allow_changes"
    """The setting that lists what a user who means it allows to differ."""
    ignored: tuple[str, ...] = ("run_dir",)
    """Not compared: where the run directory itself is (it may be moved)."""


@dataclass
class Relaunch:
    """What resuming a checkpoint under a new config means: the checkpoint, its step, the lines to print, the
    run's history including this launch, and the settings that were overridden (their new values apply)."""

    checkpoint: Path | None = None
    step: int = 0
    lines: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)


def compare_launch(old_config: dict[str, Any], old_inputs: dict[str, str], config: dict[str, Any],
                   inputs: dict[str, str], rules: RelaunchRules, where: str, resumes: str) -> list[dict[str, Any]]:
    """Every setting that differs between a record and this launch, as {"key", "was", "now", "how"}: accepted
    (harmless), moved (another path to the same content), extended, or override. A path setting whose content
    changed under the same path counts as a change. Raises one UserError listing every refused setting."""
    old, new = flatten(old_config), flatten(config)
    allowed = new.get(rules.override) or []
    unknown = [a for a in allowed if not any(_under(k, [a]) for k in new)]
    if unknown:
        raise UserError(f"{rules.override}={allowed}: {unknown} names no setting of this config (a typo?); list "
                        "dotted keys such as optim.lr, or whole sections such as optim")
    changes, refused = [], []
    keys = set(old) | set(new) | {base_key(k) for k in (*old_inputs, *inputs)}
    for key in sorted(k for k in keys if k != rules.override and not _under(k, rules.ignored)):
        was, now = old.get(key), new.get(key)
        fp_was = {k: v for k, v in old_inputs.items() if base_key(k) == key}
        fp_now = {k: v for k, v in inputs.items() if base_key(k) == key}
        if was == now and fp_was == fp_now:
            continue
        if was == now:  # the same path, other content (a model retrained in place, a dataset re-packed)
            was, now = f"{was} (content {_fps(fp_was)})", f"{now} (content {_fps(fp_now)})"
            how = "content"
        elif fp_was and fp_was == fp_now:
            how = "moved"
        elif _under(key, rules.harmless):
            how = "accepted"
        elif _under(key, rules.extendable) and isinstance(was, int) and isinstance(now, int) and now > was:
            how = "extended"
        else:
            how = "refused"
        if how in ("content", "refused") and _under(key, allowed) and not _under(key, rules.fixed):
            how = "override"
        (refused if how in ("content", "refused") else changes).append({"key": key, "was": was, "now": now, "how": how})
    if refused:
        listed = "; ".join(f"{c['key']}: {c['was']!r} there, {c['now']!r} here" for c in refused)
        fixed = [c["key"] for c in refused if _under(c["key"], rules.fixed)]
        free = [c["key"] for c in refused if c["key"] not in fixed]
        todo = "use another run_dir"
        if free:
            todo += (f", or set {rules.override}=[{', '.join(free)}] to {resumes} anyway (the history records both "
                     "values)")
        if fixed:
            todo += (f"; {', '.join(fixed)} cannot change in a resumed run (the checkpoint's tensors have the old "
                     "shapes)")
        also = [c["key"] for c in changes]
        raise UserError(f"{where}: this launch changes settings that change the math ({listed}); {todo}. Nothing "
                        "was changed on disk" + (f" (accepted as they are: {', '.join(also)})" if also else ""))
    return changes


def base_key(key: str) -> str:
    """The setting a list item's key belongs to: `a.b[2]` -> `a.b`."""
    return re.sub(r"\[\d+\]$", "", key)


def _fps(fps: dict[str, str]) -> str:
    return ", ".join(fps.values()) or "none"


def describe_change(c: dict[str, Any]) -> str:
    return f"{c['key']}: {c['was']!r} -> {c['now']!r} ({c['how']})"
