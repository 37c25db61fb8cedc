"""Evaluation CLI against hand computations, the cloze builder, the markdown report, and the shortened full-cycle
demo through `make demo`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml

from slm_assist.core.errors import UserError
from slm_assist.eval import cloze_accuracy, dataset_loss, load_model, multiple_choice_accuracy

from .conftest import REPO, TINY_MODEL, clean_env, error_line, run_module


@pytest.fixture(scope="module")
def uniform_model(tiny_slm, tmp_path_factory):
    """tiny_slm with a zero output layer: every next-token distribution is uniform over the vocabulary."""
    model, tok = load_model(tiny_slm, torch.device("cpu"))
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    out = tmp_path_factory.mktemp("uniform") / "m"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_loss_of_a_uniform_model_is_log_vocab(uniform_model, tiny_data):
    model, tok = load_model(uniform_model)
    r = dataset_loss(model, tok, tiny_data)
    # every token's loss is log V rounded to fp32, summed in fp32 over batches of 8 x 31 tokens: a relative error
    # of at most 8·31·eps whatever the CPU's reduction order (1e-6, 8 eps, held only for this machine's order)
    rel = 8 * 31 * torch.finfo(torch.float32).eps
    assert r["loss"] == pytest.approx(math.log(len(tok)), rel=rel)
    # exp: the perplexity's relative error is the loss's absolute error
    assert r["perplexity"] == pytest.approx(len(tok), rel=math.expm1(math.log(len(tok)) * rel))
    n_val = json.loads((tiny_data / "manifest.json").read_text())["splits"]["validation"]["sequences"]
    assert r["tokens"] == n_val * 31


def test_loss_matches_hf_labels_loss(tiny_slm, tiny_data):
    from slm_assist.core.dataset import load_split

    model, tok = load_model(tiny_slm)
    ids = torch.tensor(load_split(tiny_data, "validation")[:10]["input_ids"])
    expected = model(input_ids=ids, labels=ids).loss.item()  # HF's own shift + mean over 10 x 31 tokens
    assert dataset_loss(model, tok, tiny_data, batch_size=3, max_rows=10)["loss"] == pytest.approx(expected, rel=1e-5)


def test_multiple_choice_by_hand_on_a_uniform_model(uniform_model, tmp_path):
    """Uniform model: log p(choice) = -n_tokens · log V, so acc picks the fewest tokens and acc_norm the fewest
    tokens per character."""
    model, tok = load_model(uniform_model)
    choices = [" x", " documentation of this module"]
    n_tok = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in choices]
    lls = [-n * math.log(len(tok)) for n in n_tok]
    want = max(range(2), key=lambda i: lls[i])
    want_norm = max(range(2), key=lambda i: lls[i] / len(choices[i]))
    path = tmp_path / "mc.jsonl"
    rows = [{"input": "Return", "choices": choices, "label": want},
            {"input": "Return", "choices": choices, "label": want_norm}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = multiple_choice_accuracy(model, tok, path)
    assert want != want_norm  # the example separates the two metrics
    assert r["accuracy"] == 0.5 and r["accuracy_norm"] == 0.5


def test_cloze_accuracy_matches_greedy_generation(tiny_slm, tmp_path):
    """An item counts as correct exactly when greedy decoding reproduces the target's tokens."""
    from slm_assist.eval import _split_ids

    model, tok = load_model(tiny_slm)
    items = [{"context": "The function returns the value of the", "target": w} for w in ("value", "module", "the")]
    greedy_target = None
    ctx, _ = _split_ids(tok, items[0]["context"], " value")
    out = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    greedy_text = tok.decode(out[0, len(ctx):])
    greedy_target = greedy_text.split()[0] if greedy_text.split() else "zzz"
    items.append({"context": items[0]["context"], "target": greedy_target})
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    r = cloze_accuracy(model, tok, path)
    expected = 0
    for it in items:
        c, t = _split_ids(tok, it["context"], " " + it["target"])
        gen = model.generate(torch.tensor([c]), max_new_tokens=len(t), do_sample=False, pad_token_id=tok.eos_token_id)
        expected += gen[0, len(c):].tolist() == t
    assert expected >= 1  # the item built from greedy decoding is right
    assert r["accuracy"] == expected / len(items)


def test_speed_measures_batched_throughput_and_generation_latency(tiny_slm, monkeypatch):
    import time

    from slm_assist.eval import evaluate

    res = evaluate(tiny_slm, [], speed=True)["results"]
    (speed,) = res
    assert speed["task"] == "speed" and speed["seq_len"] == 64  # capped at the model's context
    assert speed["batched_tokens_per_s"] > 0 and speed["generate_ms_per_token"] > 0
    clock = iter(range(0, 10**6, 2))  # every timed call "takes" 2 s: the figures are computed from the clock
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    speed = evaluate(tiny_slm, [], speed=True)["results"][0]
    assert speed["batched_tokens_per_s"] == pytest.approx(8 * 64 / 2)
    assert speed["generate_ms_per_token"] == pytest.approx(1000 * 2 / 32)


def test_bad_eval_inputs_are_clear_errors(tiny_slm, tmp_path, slm_other_tokenizer, tiny_data):
    model, tok = load_model(tiny_slm)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: missing field\(s\) \['target'\]"):
        cloze_accuracy(model, tok, bad)
    other, other_tok = load_model(slm_other_tokenizer)
    with pytest.raises(UserError, match=r"the model: tokenizer fingerprint \w+ differs from the data's \w+ .*not comparable"):
        dataset_loss(other, other_tok, tiny_data)
    res = run_module("slm_assist.eval", [str(tiny_slm), str(tmp_path / "missing.jsonl")])
    assert res.returncode == 2 and "missing.jsonl: no such file or directory" in res.stderr


@pytest.fixture(scope="module")
def broken_weights_model(tiny_slm, tiny_data, tmp_path_factory):
    """tiny_slm with its weights file cut short and run metadata naming tiny_data: any error that mentions the
    data, not "cannot load", proves the inputs were checked before the model was loaded."""
    import shutil

    from slm_assist.core.model_dir import META, ModelDir

    out = tmp_path_factory.mktemp("broken") / "m"
    shutil.copytree(tiny_slm, out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    (out / META).write_text(json.dumps({"run_config": {"data": {"path": str(tiny_data)}}}))
    with pytest.raises(UserError, match="cannot load"):
        ModelDir(out).load(torch.device("cpu"), 1)
    return out


LONG = ["many words"] * 50
GOOD_CLOZE = '{"context": "a b", "target": "c"}\n'
GOOD_MC = '{"input": "a", "choices": [" b", " c"], "label": 0}\n'

# (case, file contents (bytes or text; None: no file), extra CLI arguments, what the error line must contain)
BAD_EVAL_INPUTS = [
    ("latin-1 first line", '{"context": "caf\xe9", "target": "x"}\n'.encode("latin-1"), [],
     ["bad.jsonl:1: not UTF-8 text", "0xe9"]),
    ("latin-1 later line", (GOOD_CLOZE + '{"context": "na\xefve", "target": "x"}\n').encode("latin-1"), [],
     ["bad.jsonl:2: not UTF-8 text", "0xef"]),
    ("first line an array", "[1, 2]\n", [], ["bad.jsonl:1:", "not a JSON object", "[1, 2]"]),
    ("later line a string", GOOD_CLOZE + '"x"\n', [], ["bad.jsonl:2:", "not a JSON object", "'x'"]),
    ("later line an array", GOOD_MC + "\n[1, 2]\n", [], ["bad.jsonl:3:", "not a JSON object", "[1, 2]"]),
    ("context a number", '{"context": 5, "target": "x"}\n', [], ["bad.jsonl:1:", "'context'", "5"]),
    ("target a list", GOOD_CLOZE + '{"context": "a", "target": ["x"]}\n', [], ["bad.jsonl:2:", "'target'", "['x']"]),
    ("target missing", '{"context": "a"}\n', [], ["bad.jsonl:1:", "missing field(s) ['target']"]),
    ("input null", '{"input": null, "choices": ["a", "b"], "label": 0}\n', [], ["bad.jsonl:1:", "'input'", "None"]),
    ("long value shortened", json.dumps({"context": LONG, "target": "x"}) + "\n", [],
     ["bad.jsonl:1:", "'context'", "['many words', ", "..."]),
    ("choices a string", GOOD_MC + '{"input": "a", "choices": "ab", "label": 0}\n', [],
     ["bad.jsonl:2:", "'choices'", "'ab'"]),
    ("choices a non-string", '{"input": "a", "choices": ["b", 3], "label": 0}\n', [],
     ["bad.jsonl:1:", "'choices'", "choices[1] is 3"]),
    ("one choice", '{"input": "a", "choices": ["b"], "label": 0}\n', [], ["bad.jsonl:1:", "'choices'", "['b']"]),
    ("label a bool", '{"input": "a", "choices": ["b", "c"], "label": true}\n', [],
     ["bad.jsonl:1:", "'label'", "True"]),
    ("label a string", '{"input": "a", "choices": ["b", "c"], "label": "1"}\n', [],
     ["bad.jsonl:1:", "'label'", "'1'"]),
    ("label a float", '{"input": "a", "choices": ["b", "c"], "label": 1.0}\n', [],
     ["bad.jsonl:1:", "'label'", "1.0"]),
    ("label out of range", GOOD_MC + '{"input": "a", "choices": ["b", "c"], "label": 2}\n', [],
     ["bad.jsonl:2:", "'label'", "2"]),
    ("no such split", None, ["{data}", "--split", "nope"], ["--split='nope'", "no such split"]),
    ("not a packed dataset", None, ["{tmp}"], ["not a packed dataset"]),
    ("no DATA", None, [], ["no DATA", "packed dataset", "{context, target}", "{input, choices, label}",
                            "trained on {data}", "python -m slm_assist.eval {model} {data}"]),
    ("--out an existing directory", GOOD_CLOZE, ["--out", "{tmp}"], ["--out={tmp}", "is a directory"]),
    ("--out under a file", GOOD_CLOZE, ["--out", "{tmp}/bad.jsonl/results.json"], ["--out", "is a file"]),
    ("--out unwritable", GOOD_CLOZE, ["--out", "/sys/x/results.json"],
     ["--out=/sys/x/results.json", "cannot write in /sys"]),
    ("--max-rows 0", None, ["{data}", "--max-rows", "0"],
     ["--max-rows 0: expected a positive number of sequences / examples per input, or -1 for all"]),
    ("--max-rows -2", GOOD_CLOZE, ["--max-rows", "-2"], ["--max-rows -2:", "or -1 for all"]),
]


@pytest.mark.parametrize("case,content,args,expected", BAD_EVAL_INPUTS, ids=[c[0] for c in BAD_EVAL_INPUTS])
def test_bad_eval_cli_inputs_are_one_line_errors_before_the_model_loads(case, content, args, expected,
                                                                        broken_weights_model, tiny_data, tmp_path):
    subs = {"{data}": str(tiny_data), "{tmp}": str(tmp_path), "{model}": str(broken_weights_model)}

    def sub(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    argv = [str(broken_weights_model)]
    if content is not None:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
        argv.append(str(bad))
    res = run_module("slm_assist.eval", argv + [sub(a) for a in args], timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    line = error_line(res.stderr)
    for want in expected:
        assert sub(want) in line, (want, line)
    assert len(line) < 600, line  # values are shortened


@pytest.mark.parametrize("max_rows", [0, -2])
def test_max_rows_is_positive_or_minus_one(tiny_slm, tiny_data, tmp_path, max_rows):
    """--max-rows 0 used to divide by zero (loss) or score everything (cloze, multiple choice)."""
    model, tok = load_model(tiny_slm)
    path = tmp_path / "c.jsonl"
    path.write_text(GOOD_CLOZE)
    for run in (lambda: dataset_loss(model, tok, tiny_data, max_rows=max_rows),
                lambda: cloze_accuracy(model, tok, path, max_rows),
                lambda: multiple_choice_accuracy(model, tok, path, max_rows)):
        with pytest.raises(UserError, match=rf"--max-rows {max_rows}: expected a positive number .* or -1 for all"):
            run()


@pytest.fixture(scope="module")
def overflow_model(tiny_slm, tmp_path_factory):
    """tiny_slm with a huge output layer: a mean loss in the thousands of nats, whose exp overflows a float."""
    model, tok = load_model(tiny_slm, torch.device("cpu"))
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, std=1000.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("overflow") / "m"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_a_perplexity_too_large_for_a_float_is_inf(overflow_model, tiny_data):
    model, tok = load_model(overflow_model)
    r = dataset_loss(model, tok, tiny_data, max_rows=4)
    assert r["loss"] > 710 and r["perplexity"] == math.inf


@pytest.mark.slow
def test_an_inf_perplexity_goes_through_eval_json_to_its_readers(overflow_model, tiny_data, tmp_path):
    """eval --out writes inf as `Infinity` (Python's JSON for it); read_eval gives a float back, and the hub card
    and the report format it as `inf`."""
    from slm_assist.core.run_dir import read_eval
    from slm_assist.hub import _metrics_rows
    from slm_assist.report import _fmt

    run_dir = tmp_path / "run"
    out = run_dir / "eval.json"
    res = run_module("slm_assist.eval", [str(overflow_model), str(tiny_data), "--max-rows", "4", "--out", str(out)],
                     timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "perplexity=inf" in res.stdout
    assert '"perplexity": Infinity' in out.read_text()
    (r,) = read_eval(run_dir)
    assert r["loss"] > 710 and r["perplexity"] == math.inf
    rows = dict(_metrics_rows(run_dir / "final", {}))
    assert rows[f"loss / perplexity on `{tiny_data.name}` validation"] == f"{r['loss']:.4f} / inf"
    assert _fmt(r["perplexity"], ".1f") == "inf"


def test_cloze_builder_uses_only_held_out_documents(tiny_data, tmp_path):
    from data_tools.cloze import cloze_examples
    from data_tools.corpus import read_documents
    from data_tools.pack import PrepareConfig, is_validation_doc
    from slm_assist.core.config import load_config

    out = tmp_path / "c.jsonl"
    res = run_module("data_tools.cloze", [str(tiny_data), str(out), "--examples", "20", "--context-chars", "300"])
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 20
    cfg = load_config(PrepareConfig, tiny_data / "prepare_config.yaml")
    docs = list(read_documents(cfg.corpus))
    held = [d for i, d in enumerate(docs) if is_validation_doc(i, 0, 0.1)]
    for r in rows:
        assert any(r["context"] in d and d[d.find(r["context"]) + len(r["context"]):].lstrip().startswith(
            r["target"] + ".") for d in held)
        assert r["target"] in r["context"].split() or r["target"] in r["context"]
    assert cloze_examples(["word " * 30 + "final answer is Apple. More text."]) == []  # capitalised: skipped
    assert cloze_examples(["the value " * 20 + "is the value."])[0]["target"] == "value"


def test_report_sections_are_replaced_not_duplicated(tmp_path):
    from slm_assist.report import write_section

    rep = tmp_path / "r.md"
    write_section(rep, "a", "## A\none")
    write_section(rep, "b", "## B\ntwo")
    write_section(rep, "a", "## A\nthree")
    text = rep.read_text()
    assert text.count("## A") == 1 and "three" in text and "one" not in text and "## B\ntwo" in text
    assert text.index("## A") < text.index("## B")


@pytest.mark.slow
def test_shortened_demo_writes_the_full_cycle_report(tmp_path):
    demo = tmp_path / "demo"
    train = " ".join([*TINY_MODEL, "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
                      "checkpoint.every=0", "train.torch_threads=1"])
    compress = tmp_path / "compress.yaml"  # the demo's stages, two steps each, into the (tiny) demo SLM
    stages = yaml.safe_load((REPO / "configs/demo/compress.yaml").read_text())["stages"]
    compress.write_text(yaml.safe_dump({
        "base": str(REPO / "configs/demo/compress.yaml"),
        "train": {"eval_every": 2, "eval_batches": 1, "torch_threads": 1}, "checkpoint": {"every": 0},
        "stages": [{**s, "max_steps": 2} for s in stages]}))
    env = clean_env()
    res = subprocess.run(["make", "-s", "demo", f"DEMO={demo}", f"DEMO_ARGS={train}", f"DEMO_COMPRESS={compress}",
                          "DEMO_PACK_ARGS=corpus.max_docs=40 tokenizer.vocab_size=400 pack.seq_len=32",
                          "DEMO_TASK_ARGS=corpus.max_docs=60 pack.seq_len=32"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (demo / "report.md").read_text()
    for section in ("## Data", "## Data selection", "## Training runs", "## Compression"):
        assert section in report
    assert re.search(r"compress \(task loss\): teacher \d+\.\d+, student from scratch \d+\.\d+, compressed "
                     r"student \d+\.\d+; gap recovered .*; student speed \d+\.\dx the teacher's", res.stdout)
    for row in ("teacher: fine-tuned on the task (finetune)", "student from scratch", "compressed student (tsd)"):
        assert re.search(rf"\| {re.escape(row)}[^|]* \| [\d.]+M \| \d+ \| \d+\.\d{{4}} \| \d+\.\d{{4}} \| [\d,]+ \| "
                         r"\d+\.\d\d \|", report), row
    assert [ln.split(" | ")[0] for ln in report.splitlines() if ln.startswith("| ") and " / 2 | " in ln] == \
        [f"| {s['name']}" for s in stages]
    assert (demo / "compress_stages.png").stat().st_size > 1000 and "(compress_stages.png)" in report

    # the README's promise: `make demo` again resumes; finished runs are left as they are (the user's files too)
    (demo / "salt" / "final" / "NOTES.md").write_text("mine\n")
    finals = {p: p.stat().st_mtime_ns for p in demo.glob("*/final/model.safetensors")}
    again = subprocess.run(res.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("final/ is up to date, not exported again") == 4  # slm, llm, salt, scratch
    assert {p: p.stat().st_mtime_ns for p in demo.glob("*/final/model.safetensors")} == finals
    assert (demo / "salt" / "final" / "NOTES.md").read_text() == "mine\n"
    for run in ("slm", "llm", "salt"):
        assert f"| {run} |" in report
        assert json.loads((demo / run / "eval.json").read_text())["results"][1]["task"] == "cloze"
    assert "SALT: KD from slm, step w=0.667" in report and "SALT_DS subset" in report
    for png in ("loss_curves.png", "select_hist_salt_ds.png"):
        assert (demo / png).stat().st_size > 1000 and f"({png})" in report


LM_EVAL_TASK = """task: slm_assist_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_harness_hf_model_loads_an_export_and_agrees(uniform_model, tmp_path):
    """lm-eval-harness's `hf` model (AutoModelForCausalLM + AutoTokenizer) runs a local multiple-choice task on an
    exported directory. On the uniform model log-likelihoods depend only on how the choices tokenize, so its acc and
    acc_norm must equal ours exactly."""
    pytest.importorskip("lm_eval")
    data = tmp_path / "mc.jsonl"
    rows = [{"input": "The function returns", "choices": [" x", " the documentation of this module"], "label": 0},
            {"input": "Import the", "choices": [" module", " zzzz qqq www"], "label": 1},
            {"input": "See", "choices": [" also", " the section about the module", " a"], "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(LM_EVAL_TASK.format(data=data))
    script = (
        "import json, lm_eval\n"
        "from lm_eval.tasks import TaskManager\n"
        f"r = lm_eval.simple_evaluate(model='hf', model_args='pretrained={uniform_model},dtype=float32', "
        f"tasks=['slm_assist_tiny_mc'], task_manager=TaskManager(include_path='{tmp_path / 'tasks'}'), "
        "device='cpu', batch_size=1)\n"
        "print(json.dumps(r['results']['slm_assist_tiny_mc']))\n")
    env = clean_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    model, tok = load_model(uniform_model)
    ours = multiple_choice_accuracy(model, tok, data)
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["accuracy_norm"])
    assert 0 < ours["accuracy"] < 1 or 0 < ours["accuracy_norm"] < 1  # not a degenerate all-or-nothing case
