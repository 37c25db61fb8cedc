"""The `compress` section of a markdown report (`python -m slm_assist.report ... --compress RUN_DIR`): teacher,
student from scratch and compressed student side by side on the task and general data, the share of the
scratch->teacher gap the student recovers, their inference speed, and every stage with its curves.

Figures come from what the runs left: `run_dir/config.yaml` (written by `slm_assist.compress`), each stage's
final/ and metrics.jsonl, and the `eval.json` that `python -m slm_assist.eval MODEL TASK GENERAL --speed --out
RUN/eval.json` writes next to a run's final/. Whatever was not evaluated shows as a dash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slm_assist.compress.stages import CONFIG, CompressConfig
from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import ModelDir
from slm_assist.core.run_dir import RecipeSummary, RunDir


def describe(meta: dict[str, Any], run_dir: str | Path) -> RecipeSummary:
    """A compress stage's run as reports and cards show it (the stage records themselves are rendered from the
    metadata's `stages`, whatever the recipe)."""
    records = meta.get("stages") or []
    last = records[-1] if records else {}
    who = "fine-tuned teacher" if last.get("trains") == "teacher" else "compressed student"
    names = " → ".join(r.get("name", "?") for r in records)
    return RecipeSummary(f"compress: {who}, stage {last.get('name', '?')} of {names}" if records else "compress",
                         tags=["distillation", "compression"] if who == "compressed student" else [])


def gap_recovered(scratch: float | None, student: float | None, teacher: float | None) -> float | None:
    """(L_scratch - L_student) / (L_scratch - L_teacher): 1 = the student matches the teacher, 0 = no better than
    training it from scratch. None when a figure is missing or the teacher does not beat the scratch student."""
    if scratch is None or student is None or teacher is None or scratch <= teacher:
        return None
    return (scratch - student) / (scratch - teacher)


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def model_figures(label: str, model_dir: Path, task: str, general: str) -> dict[str, Any]:
    """One model's row: its size and what `slm_assist.eval --out <run>/eval.json` measured for it."""
    meta = ModelDir(model_dir).meta() or {}
    results = RunDir(model_dir.parent).eval_results()
    loss = {r["data"]: r["loss"] for r in results if r.get("task") == "loss" and r.get("split") == "validation"}
    speed = next((r for r in results if r.get("task") == "speed"), {})
    return {"label": label, "model": str(model_dir), "params": meta.get("params"), "steps": meta.get("step"),
            "task_loss": next((v for d, v in loss.items() if task and _same_path(d, task)), None),
            "general_loss": next((v for d, v in loss.items() if _same_path(d, general)), None),
            "tokens_per_s": speed.get("batched_tokens_per_s"), "ms_per_token": speed.get("generate_ms_per_token")}


def compress_figures(run_dir: Path, scratch: Path | None) -> dict[str, Any]:
    """Teacher, scratch and student figures of a compress run, and the stages it ran."""
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"--compress {run_dir}: no {CONFIG}; not a slm_assist.compress run directory")
    cfg = RunDir(run_dir, "--compress").read_config(CompressConfig)
    fine = [s for s in cfg.stages if s.trains == "teacher" and (run_dir / s.name / "final").is_dir()]
    done = [s for s in cfg.stages if s.trains == "student" and (run_dir / s.name / "final").is_dir()]
    if not done:
        raise UserError(f"--compress {run_dir}: no student stage has finished yet")

    def fig(label: str, model_dir: str | Path) -> dict[str, Any]:
        return model_figures(label, Path(model_dir), cfg.task_data, cfg.general_data)

    models = {"pretrained": fig("teacher: the pretrained LLM", cfg.teacher)}
    if fine:
        models["finetuned"] = fig(f"teacher: fine-tuned on the task ({fine[-1].name})", run_dir / fine[-1].name / "final")
    elif cfg.finetuned_teacher:
        models["finetuned"] = fig("teacher: fine-tuned on the task", cfg.finetuned_teacher)
    if scratch is not None:
        if not (scratch / "final").is_dir():
            raise UserError(f"--scratch {scratch}: no final/; the run has not finished")
        models["scratch"] = fig("student from scratch (same shape, task data)", scratch / "final")
    models["student"] = fig(f"compressed student ({done[-1].name})", run_dir / done[-1].name / "final")
    teacher = models.get("finetuned", models["pretrained"])
    key = "task_loss" if cfg.task_data else "general_loss"
    scratch_loss = models["scratch"][key] if "scratch" in models else None
    speeds = (models["student"]["tokens_per_s"], teacher["tokens_per_s"])
    stages = []
    for s in cfg.stages:
        final = run_dir / s.name / "final"
        stage_run = RunDir(run_dir / s.name)
        vals = stage_run.val_losses()
        ckpts = stage_run.checkpoints()
        stages.append({"name": s.name, "trains": s.trains, "teacher": s.teacher, "data": s.data,
                       "loss": {k: getattr(s.loss, k) for k in ("ce", "kd", "hidden", "attention")
                                if getattr(s.loss, k)},
                       "max_steps": s.max_steps, "steps": (ModelDir(final).meta() or {}).get("step"),
                       "interrupted_at": RunDir.step_of(ckpts[-1]) if ckpts else None,
                       "val_loss": vals[-1] if vals else None})
    models["student"]["steps"] = sum(s["steps"] or 0 for s in stages if s["trains"] == "student")  # all stages'
    return {"run_dir": str(run_dir), "init": cfg.init.kind, "metric": key, "models": models, "stages": stages,
            "student_steps": models["student"]["steps"],
            "gap_recovered": gap_recovered(scratch_loss, models["student"][key], teacher[key]),
            "speedup_batched": speeds[0] / speeds[1] if all(speeds) else None}


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def plot_stages(run_dir: Path, figures: dict[str, Any], path: Path) -> None:
    """Training loss and validation CE of every stage, end to end on one step axis per model trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    offset = {"student": 0, "teacher": 0}
    for s in figures["stages"]:
        recs = RunDir(run_dir / s["name"]).metrics()
        x0 = offset[s["trains"]]
        style = "--" if s["trains"] == "teacher" else "-"
        train = [(x0 + r["step"], r["loss"]) for r in recs if isinstance(r.get("loss"), float)]
        val = [(x0 + r["step"], r["val_loss"]) for r in recs if isinstance(r.get("val_loss"), float)]
        label = f"{s['name']} ({s['data']})" + (" [teacher]" if s["trains"] == "teacher" else "")
        if train:
            ax_t.plot(*zip(*train), style, lw=1, label=label)
        if val:
            ax_v.plot(*zip(*val), style, marker="o", ms=3, label=label)
        offset[s["trains"]] = x0 + (s["steps"] or 0)
    scratch = figures["models"].get("scratch", {}).get(figures["metric"])
    if scratch is not None:
        ax_v.axhline(scratch, color="grey", ls=":", label="scratch student (final)")
    ax_t.set(title="training loss of each stage (its own objective)", xlabel="step", ylabel="loss", yscale="log")
    ax_v.set(title="validation CE (on each stage's data)", xlabel="step", ylabel="loss")
    for a in (ax_t, ax_v):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compress_summary(f: dict[str, Any]) -> str:
    """The headline figures in one line, for the console."""
    m, key = f["models"], f["metric"]
    teacher = m.get("finetuned", m["pretrained"])
    return (f"compress ({key.replace('_', ' ')}): teacher {_fmt(teacher[key])}, student from scratch "
            f"{_fmt(m.get('scratch', {}).get(key))}, compressed student {_fmt(m['student'][key])}; gap recovered "
            f"{_fmt(f['gap_recovered'], '.2f')}; student speed {_fmt(f['speedup_batched'], '.1f')}x the teacher's")


def compress_section(f: dict[str, Any], out_dir: Path) -> str:
    """The markdown section of `compress_figures`; its plot is written to out_dir/compress_stages.png."""
    run_dir = Path(f["run_dir"])
    plot_stages(run_dir, f, out_dir / "compress_stages.png")
    lines = ["## Compression", "",
             f"`{run_dir}`: the pretrained LLM distilled into a student (init `{f['init']}`) in "
             f"{len(f['stages'])} stages; the student trained {f['student_steps']} steps in all.", "",
             "| model | params | steps | task val loss | general val loss | batched tokens/s | generation ms/token |",
             "|---|---|---|---|---|---|---|"]
    for m in f["models"].values():
        params = "—" if m["params"] is None else f"{m['params'] / 1e6:.2f}M"
        lines.append(f"| {m['label']} | {params} | {_fmt(m['steps'], 'd')} | {_fmt(m['task_loss'])} | "
                     f"{_fmt(m['general_loss'])} | {_fmt(m['tokens_per_s'], ',.0f')} | {_fmt(m['ms_per_token'], '.2f')} |")
    lines += ["", f"Share of the scratch→teacher gap the compressed student recovers, (L_scratch − L_student) / "
                  f"(L_scratch − L_teacher) on the {f['metric'].split('_')[0]} validation loss: "
                  f"**{_fmt(f['gap_recovered'], '.2f')}**. The student runs **{_fmt(f['speedup_batched'], '.1f')}×** "
                  "the teacher's batched tokens/s.", "",
              "| stage | trains | teacher | data | loss weights | steps | val loss (last) |", "|---|---|---|---|---|---|---|"]
    for s in f["stages"]:
        loss = ", ".join(f"{k} {v:g}" for k, v in s["loss"].items())
        steps = (f"{s['steps']} / {s['max_steps']}" if s["steps"] is not None else
                 f"interrupted at {s['interrupted_at']} / {s['max_steps']}" if s["interrupted_at"] else "not run")
        lines.append(f"| {s['name']} | {s['trains']} | {s['teacher']} | {s['data']} | {loss} | {steps} | "
                     f"{_fmt(s['val_loss'])} |")
    lines += ["", "![compression stages](compress_stages.png)", ""]
    return "\n".join(lines)
