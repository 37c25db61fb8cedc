"""A run directory and its one owner, `RunDir`: what is in it, which config made each checkpoint, who is training in
it, and whether what it reads back is what it wrote. Nothing else writes or deletes inside a run directory's
checkpoints/, and readers (report, hub, the compress report) open runs through it.

    <run_dir>/config.yaml              the resolved config of the latest launch that was accepted
    <run_dir>/deepspeed_config.json    the DeepSpeed settings derived from it
    <run_dir>/metrics.jsonl, tensorboard/   the training log (training/metrics.py writes it)
    <run_dir>/checkpoints/step_NNNNNNNN/    DeepSpeed's files, the train state, and `slm_assist_checkpoint.json`
                                       (written last): the resolved config and the input fingerprints that made
                                       the checkpoint, the run's relaunch history, and a sha256 of every file
    <run_dir>/final/                   the exported model directory (core/model_dir.py)
    <run_dir>/eval.json                `python -m slm_assist.eval --out`
    <run_dir>/.slm_assist.lock         held (flock) by the process training in the run directory

A relaunch is compared with the record of the checkpoint it resumes: every differing setting is listed; those that
change the math (model, data, objective, optimizer, schedule) are refused before anything is written, those that
cannot (cadences, threads, a longer run) are accepted with a line. `checkpoint.allow_changes` lets a user who means
it resume anyway; the history then records the old and the new value.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from slm_assist.core.config import load_config
from slm_assist.core.errors import UserError
from slm_assist.core.files import LockBusy, atomic_write_text, file_sha256, lock_file
from slm_assist.core.model_dir import META, ModelDir
from slm_assist.core.relaunch import (
    Relaunch,
    RelaunchRules,
    base_key,
    compare_launch,
    describe_change,
    flatten,
)

CONFIG = "config.yaml"
DS_CONFIG = "deepspeed_config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
LOCK = ".slm_assist.lock"
RECORD = "slm_assist_checkpoint.json"
RECORD_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class RecipeSummary:
    """How a run's recipe reads (each recipe's `describe` makes one from the run's exported metadata): a table
    cell (`short`), a model-card section (`title`, `lines`), hub tags."""

    short: str
    title: str = ""
    lines: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    selection: str = ""
    """The data_tools.select subset the run trained on, as recorded (relative to the run directory): its dataset
    card goes with the model. "" = none."""


def path_name(path: str | Path) -> str:
    """A path as text that travels with a model (metadata history, cards): its last part, the last two when that
    is `final` (`slm/final`), never the local directories above it."""
    parts = [p for p in PurePath(path).parts if p not in ("/", ".", "..", "~")]
    if not parts:
        return str(path)
    return "/".join(parts[-2:] if parts[-1] == FINAL else parts[-1:])


# ---- the run directory -------------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # realpath -> [the held lock, holders in this process] (re-entrant per path)


class RunInUseError(UserError):
    pass


class RunDir:
    """A run directory. `field` names the setting or argument that pointed here (`run_dir`, `--compress`), for
    the errors."""

    def __init__(self, path: str | Path, field: str = "run_dir") -> None:
        self.path = Path(path)
        self.field = field
        self.name = f"{field}={path}"
        self._locked = False

    @classmethod
    def open(cls, path: str | Path, field: str = "run_dir") -> RunDir:
        """An existing run directory, for reading."""
        d = cls(path, field)
        if not d.path.is_dir():
            raise UserError(f"{d.name}: " + ("not a run directory (a file)" if d.path.exists() else "no such directory"))
        return d

    # ---- files -----------------------------------------------------------------------------------------------
    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def checkpoints_root(self) -> Path:
        return self.path / CHECKPOINTS

    def resolve(self, recorded: str | Path) -> Path:
        """A path recorded in this run's exported metadata (relative to the run directory, or absolute)."""
        p = Path(recorded)
        return p if p.is_absolute() else self.path / p

    def write_config(self, text: str, ds_config: dict[str, Any] | None = None) -> None:
        """config.yaml (and deepspeed_config.json): only once the launch has been accepted."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, text)
        if ds_config is not None:
            atomic_write_text(self.path / DS_CONFIG, json.dumps(ds_config, indent=2) + "\n")

    def read_config(self, cls: type) -> Any:
        """config.yaml as the config class that wrote it."""
        if not (self.path / CONFIG).is_file():
            raise UserError(f"{self.name}: no {CONFIG}; not a run directory of this tool")
        return load_config(cls, self.path / CONFIG)

    def meta(self) -> dict[str, Any]:
        """The exported run metadata of a finished run (final/slm_assist.json), checked for its fields."""
        meta = ModelDir(self.final).meta()
        if meta is None:
            raise UserError(f"{self.path}: no {FINAL}/{META}; the run has not finished")
        fields = ("run_config", "params", "step", "tokens_seen")
        missing = [k for k in fields if k not in meta] if isinstance(meta, dict) else list(fields)
        if missing or not isinstance(meta["run_config"], dict):
            raise UserError(f"{self.final / META}: not slm_assist run metadata (missing or bad field(s) "
                            f"{missing or ['run_config']})")
        return meta

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def val_losses(self) -> list[float]:
        return [r["val_loss"] for r in self.metrics() if isinstance(r.get("val_loss"), float)]

    def eval_results(self) -> list[dict[str, Any]]:
        return read_eval(self.path)

    # ---- the lock --------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run directory for this process's training (released by `unlock` or when the process ends, also
        by kill -9). A second process gets one clear error naming the holder; the same process may take it again
        (a second run in one process, e.g. after an error, is its own owner)."""
        if self._locked:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key not in _HELD:
            stack = contextlib.ExitStack()
            try:
                if not stack.enter_context(lock_file(self.path / LOCK)):
                    print(f"note: {self.name}: the filesystem has no locks; make sure no other process trains there",
                          flush=True)
            except LockBusy as e:
                raise RunInUseError(f"{self.name}: in use by {e.holders} (it holds {self.path / LOCK}); wait for "
                                    f"it to finish, or use another {self.field}") from None
            _HELD[key] = [stack, 0]
        _HELD[key][1] += 1
        self._locked = True

    def unlock(self) -> None:
        if not self._locked:
            return
        self._locked = False
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0].close()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    @staticmethod
    def step_of(path: Path) -> int:
        return int(_STEP_DIR.match(path.name).group(1))

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints (their record written), oldest first."""
        root = self.checkpoints_root
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / RECORD).is_file())

    def legacy_checkpoints(self) -> list[Path]:
        """Checkpoint directories without a record: written by an older version (with a pickled train state)."""
        root = self.checkpoints_root
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and not (p / RECORD).exists())

    def record(self, checkpoint: Path) -> dict[str, Any]:
        try:
            record = json.loads((checkpoint / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{checkpoint / RECORD}: unreadable checkpoint record: {e}") from None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise UserError(f"{checkpoint / RECORD}: not a checkpoint record of this version")
        return record

    def newest_recorded(self) -> Path | None:
        """The newest checkpoint whose record reads back (what a check of a launch compares with, unhashed)."""
        for ckpt in reversed(self.checkpoints()):
            try:
                self.record(ckpt)
            except UserError:
                continue
            return ckpt
        return None

    def files(self, checkpoint: Path) -> list[str]:
        """The files of a (temp) checkpoint directory, relative to it, that its record covers."""
        return sorted(str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file() and f.name != RECORD)

    def damage(self, checkpoint: Path, names: list[str] | None = None) -> str | None:
        """What is wrong with a checkpoint against the record it was committed with (only its files in `names`,
        None = all: ranks split the hashing), or None when it is intact."""
        try:
            expected = self.record(checkpoint).get("files") or {}
        except UserError as e:
            return str(e)
        for rel in sorted(expected) if names is None else names:
            f = checkpoint / rel
            if not f.is_file():
                return f"{rel} is missing"
            if file_sha256(f) != expected[rel]:
                return f"{rel} does not match its checksum"
        return None

    def set_aside(self, checkpoint: Path, problem: str) -> Path:
        """Move a damaged checkpoint out of the way (never deleted: the user may want to look at it)."""
        aside, n = checkpoint.with_name(f"damaged-{checkpoint.name}"), 1
        while aside.exists():
            n += 1
            aside = checkpoint.with_name(f"damaged{n}-{checkpoint.name}")
        os.replace(checkpoint, aside)
        print(f"warning: {checkpoint} is damaged ({problem}); moved it to {aside.name} (delete it when you no "
              "longer need it); the run resumes from the checkpoint before it", flush=True)
        return aside

    def damaged(self) -> list[Path]:
        """Checkpoints set aside as damaged."""
        root = self.checkpoints_root
        return sorted(p for p in root.iterdir() if p.name.startswith("damaged")) if root.is_dir() else []

    def checkpoint_tmp(self, step: int) -> str:
        """The tag a checkpoint is written under before `commit` renames it into place."""
        return f".tmp-step_{step:08d}"

    def clean_partial(self) -> None:
        """Remove checkpoints that never committed (a kill mid-write); call on one rank, before any save."""
        root = self.checkpoints_root
        if root.is_dir():
            for p in root.glob(".tmp-step_*"):
                shutil.rmtree(p, ignore_errors=True)

    def discard_checkpoints(self) -> int:
        """checkpoint.resume=false: the previous run's checkpoints go at the start (ours: a run that starts over
        must never later be resumed as the old one). Returns how many went."""
        old = self.checkpoints() + self.legacy_checkpoints()
        for p in old:
            shutil.rmtree(p)
        return len(old)

    def commit(self, step: int, record: dict[str, Any], files: dict[str, str], keep_last: int) -> Path:
        """Make the checkpoint written under `checkpoint_tmp(step)` complete: `record` and the sha256 of every file
        (`files`) into its record, written last; renamed into place, durable; then older checkpoints pruned to
        `keep_last`."""
        root = self.checkpoints_root
        tmp, final = root / self.checkpoint_tmp(step), root / f"step_{step:08d}"
        text = json.dumps({"format": RECORD_FORMAT, "step": step, **record, "files": files}, indent=1, default=str)
        with open(tmp / RECORD, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-save of the same step (e.g. final == periodic): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename durable before older checkpoints are deleted
        finally:
            os.close(fd)
        for old in self.checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ---- relaunch --------------------------------------------------------------------------------------------
    def check_relaunch(self, config: dict[str, Any], inputs: dict[str, str], rules: RelaunchRules,
                       checkpoint: Path | None, max_steps_key: str = "train.max_steps", where: str = "") -> Relaunch:
        """Compare this launch with the record of `checkpoint` (the one it will resume; None = a fresh start) and
        return what resuming means; a launch that would change the math raises, with nothing changed on disk.
        `where` names the run in the error (default: the run directory and the checkpoint)."""
        if checkpoint is None:
            return Relaunch()
        step = self.step_of(checkpoint)
        max_steps = flatten(config).get(max_steps_key)
        if isinstance(max_steps, int) and step > max_steps:
            raise UserError(f"{self.name} has a checkpoint at step {step}, past {max_steps_key}={max_steps}; use "
                            f"another run_dir, raise {max_steps_key}, or set checkpoint.resume=false to start over "
                            "(the old checkpoints go as the new run saves)")
        record = self.record(checkpoint)
        changes = compare_launch(record.get("config") or {}, record.get("inputs") or {}, config, inputs, rules,
                                 where or f"{self.name} (checkpoint {checkpoint.name})", "resume")
        history = list(record.get("history") or [])
        lines = []
        paths = {base_key(k) for k in (*(record.get("inputs") or {}), *inputs)}
        kept = [{**c, **({"was": _names(c["was"]), "now": _names(c["now"])} if c["key"] in paths else {})}
                for c in changes if c["how"] != "moved"]  # the history travels with the model: names, not paths
        if kept:
            history.append({"step": step, "changes": kept})
        if changes:
            lines.append(f"{self.name}: resuming {checkpoint.name} with changed settings: "
                         + "; ".join(describe_change(c) for c in changes))
        return Relaunch(checkpoint, step, lines, history, [c["key"] for c in changes if c["how"] == "override"])


def _names(value: Any) -> Any:
    return [path_name(v) for v in value] if isinstance(value, list) else path_name(str(value)) if value else value


# ---- the training log and evaluation results ---------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] when it has none). A torn last line (a kill mid-write) is
    dropped, as the trainer's resume drops it; a corrupt line before it is an error that names it."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().splitlines(), start=1) if raw.strip()]
    records = []
    for i, (lineno, raw) in enumerate(lines):
        record = _record(raw)
        if isinstance(record, str):
            if i == len(lines) - 1:
                break  # torn by a kill mid-write
            shown = raw[:60].decode("utf-8", "replace") + ("..." if len(raw) > 60 else "")
            raise UserError(f"{path}:{lineno}: corrupt metrics record ({record}): {shown!r}")
        records.append(record)
    return records


def _record(raw: bytes) -> dict[str, Any] | str:
    """A metrics.jsonl line as a record, or what is wrong with it."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        return "not an object with an integer 'step'"
    return record


def read_eval(run_dir: str | Path) -> list[dict[str, Any]]:
    """The results `python -m slm_assist.eval --out RUN_DIR/eval.json` wrote for a run ([] when there are none)."""
    path = Path(run_dir) / EVAL
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))["results"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an slm_assist.eval result: {e}") from None
