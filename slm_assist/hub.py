"""Publish an exported model on the Hugging Face hub, with a model card generated from its run metadata.

    python -m slm_assist.hub push RUN_DIR/final --repo-id ORG/NAME [--private] [--revision R] [--create-pr]
                                  [--endpoint URL] [--timeout SECONDS] [--include-hidden]
    python -m slm_assist.hub card RUN_DIR/final            # print the generated card, upload nothing

The token comes from HF_TOKEN (or `hf auth login`), the endpoint from --endpoint or HF_ENDPOINT. The folder is
uploaded with `huggingface_hub.upload_folder` from a staging copy (hard links), so the local folder is never
modified; its own README.md, when it has one, is uploaded instead of the generated card. Hidden entries (a name
starting with '.', at any depth: `.env`, `.secrets/`) stay out of the upload unless --include-hidden; the push
prints what it left out. A model whose run distilled on a selection (`distill.data.selection`, absolute or relative to
the run directory, the model folder's parent) also gets that selection's dataset card (README.md + hist_*.png,
written by data_tools.select) under `data_card/`, linked from the generated card; a selection that is gone is only
noted. The card shows the paths it renders itself (the data sources) by their last component(s) (`corpus.txt`,
`slm/final`), never the local directories above them (the recipe lines of salt.recipe.describe and the stages'
summaries are shown as their owners wrote them). Every message that names the endpoint or a URL from the hub's
answer (ours, and huggingface_hub's own log lines during a push) has its credentials (userinfo, token-like query
parameters) replaced by `***`. The staging copy lives in the temp dir as `slm_assist_push_<pid>_*` and is removed
on every exit (errors, SIGTERM, SIGINT, SIGHUP); one left by a killed push (kill -9) is removed by the next push
once its process is gone. Every request of huggingface_hub's HTTP client (connect, each read, each write) waits at
most --timeout seconds, so a hub that accepts the connection and never answers is an error, not a hang. (Large
files to Xet-backed repos go through hf_xet's own transfer client, which has its own retry limits.)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import link_or_copy
from slm_assist.core.model_dir import META, ModelDir
from slm_assist.core.run_dir import RunDir, path_name
from slm_assist.core.selection import CARD, card_files, read_summary
from slm_assist.recipes import describe

_URL = re.compile(r"""(?:\b[A-Za-z][A-Za-z0-9+.-]*:)?//[^\s'"<>`]+""")
_BARE_USERINFO = re.compile(r"""(?<![^\s'"(<`=])[^\s/@'"<>`:=]*:[^\s/@'"<>`]*@(?=[\w\[])""")  # user:pw@host
_SECRET_PARAM = re.compile(r"token|key|secret|passw|pwd|sig|auth|credential", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`: the userinfo (`https://***@host/...`, also a
    scheme-less `user:password@host`) and the values of query parameters named like a secret (token, key, secret,
    password, sig/signature, auth, credential: `?access_token=***`)."""

    def param(p: str) -> str:
        name, eq, _ = p.partition("=")
        return f"{name}=***" if eq and _SECRET_PARAM.search(name) else p

    def url(m: re.Match[str]) -> str:
        head, _, rest = m.group(0).partition("//")
        end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        at = rest.rfind("@", 0, end)  # the userinfo ends at the last '@' before the query (a password may hold '/')
        if at >= 0:
            rest = "***" + rest[at:]
        path, q, query = rest.partition("?")
        if q:
            query, h, fragment = query.partition("#")
            rest = f"{path}?{'&'.join(param(p) for p in query.split('&'))}{h}{fragment}"
        return f"{head}//{rest}"

    return _BARE_USERINFO.sub("***@", _URL.sub(url, text))


def _shown(path: str) -> str:
    """A path setting as the card shows it: its last component (the last two when that is `final`: `slm/final`),
    never the local directories above; a URL as is, without credentials."""
    return redact(path) if "://" in path else path_name(path)


def _run_path(model_dir: Path, path: str) -> Path:
    """A path recorded in the run metadata: absolute, or relative to the run directory (the model folder's parent),
    normalised as lexically as the export's `os.path.relpath` made it."""
    return Path(os.path.normpath(RunDir(model_dir.absolute().parent).resolve(path)))


def _metrics_rows(model_dir: Path, meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    run = RunDir(model_dir.absolute().parent)
    vals = run.val_losses()
    if vals:
        rows.append(("validation loss (last training eval)", f"{vals[-1]:.4f}"))
    for r in run.eval_results():
        if r["task"] == "loss":
            rows.append((f"loss / perplexity on `{Path(r['data']).name}` {r['split']}",
                         f"{r['loss']:.4f} / {r['perplexity']:.2f}"))
        elif r["task"] == "cloze":
            rows.append((f"last-word cloze accuracy (`{Path(r['data']).name}`, {r['examples']} items)",
                         f"{r['accuracy']:.3f}"))
        elif r["task"] == "multiple_choice":
            rows.append((f"multiple-choice accuracy / norm (`{Path(r['data']).name}`)",
                         f"{r['accuracy']:.3f} / {r['accuracy_norm']:.3f}"))
    for stage in meta.get("stages", []):
        for k, v in stage.get("metrics", {}).items():
            rows.append((f"{stage.get('name', 'stage')}: {k}", f"{v:.4f}" if isinstance(v, float) else str(v)))
    return rows


DATA_CARD_DIR = "data_card"  # where the selection's dataset card goes in the model repo


def _selection(model_dir: Path, meta: dict[str, Any] | None) -> tuple[str, Path] | None:
    """The subset the run's recipe trained on, as its description names it: (as recorded, where it is), or
    None (no subset, or a model from elsewhere)."""
    selection = describe(meta, model_dir.absolute().parent).selection if meta and "run_config" in meta else ""
    return (selection, _run_path(model_dir, selection)) if selection else None


def data_card(meta: dict[str, Any] | None, model_dir: str | Path) -> tuple[list[Path] | None, str]:
    """(the dataset card files of the run's KD subset, `distill.data.selection` (absolute, or relative to the run
    directory, `model_dir`'s parent), card first; a note when the run names a selection whose card is not there).
    (None, "") for a run without a selection or a model from elsewhere."""
    found = _selection(Path(model_dir), meta)
    if found is None:
        return None, ""
    selection, path = found
    files = card_files(path)
    if files is None:
        where = "" if str(path) == selection else f" ({path})"
        return None, (f"note: the run's selection {selection}{where}: no {CARD} dataset card there (the selection was "
                      f"moved or deleted, or made before data_tools.select wrote cards); pushing without {DATA_CARD_DIR}/")
    return files, ""


def model_card(model_dir: str | Path) -> str:
    """A hub model card (YAML metadata + markdown) from the run metadata that `slm_assist.train` exports."""
    d = Path(model_dir)
    meta = ModelDir(d).meta()
    if meta is None:
        raise UserError(f"{d}: no {META}; not a model exported by slm_assist.train (cannot write its card)")
    cfg, data = meta["run_config"], meta["data_manifest"]
    recipe = describe(meta, d.absolute().parent)
    hf = ModelDir(d).config()  # the exported model's real shape (a run that started from a model dir has no other)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- slm_assist", "- causal-lm", *[f"- {t}" for t in recipe.tags], "---", ""]
    records = meta.get("stages", [])
    stages = [st.get("name", "?") for st in records]
    verb = "compressed" if any(st.get("trains", "student") == "student" for st in records) else "fine-tuned"
    made = (f"{verb} with slm_assist in {len(stages)} stage{'s' * (len(stages) != 1)} ({' → '.join(stages)}); "
            "the last ran " if stages else "pretrained with slm_assist for ")
    run_dir = Path(cfg["run_dir"])  # recorded by its last two parts
    name = run_dir.parent.name if stages else run_dir.name  # a stage's run: run_dir/<stage>
    lines += [f"# {name}", "",
              f"A {meta['params'] / 1e6:.2f}M-parameter {hf.model_type} causal LM {made}"
              f"{meta['step']:,} steps ({meta['tokens_seen']:,} tokens).", "",
              "## Data", "",
              f"- sources: {', '.join(f'`{_shown(str(s))}`' for s in data['sources'])}",
              f"- tokenizer: vocabulary {data['vocab_size']:,}, fingerprint `{data['tokenizer_fingerprint']}`",
              f"- packed into sequences of {data['seq_len']} tokens; "
              + ", ".join(f"{k}: {v['sequences']:,} sequences / {v['tokens']:,} tokens from {v['documents']:,} "
                          "documents" for k, v in data["splits"].items()),
              f"- validation held out by document (fraction {data['val_fraction']}, seed {data['seed']})"]
    selection = _selection(d, meta)
    if selection and data_card(meta, d)[0]:
        summary = read_summary(selection[1]) or {}
        lines.append(f"- Selected pretraining subset: [{DATA_CARD_DIR}/{CARD}]({DATA_CARD_DIR}/{CARD}) (the KD phase's "
                     f"`{summary.get('policy', '?')}` subset, {summary.get('kept', '?')} of {summary.get('total', '?')} "
                     "sequences)")
    lines += ["", "## Training", "",
              f"- model: hidden {hf.hidden_size}, {hf.num_hidden_layers} layers, {hf.num_attention_heads} heads, "
              f"FFN {getattr(hf, 'intermediate_size', None) or getattr(hf, 'n_inner', None) or '—'}, context "
              f"{getattr(hf, 'max_position_embeddings', '—')}",
              f"- optimiser: AdamW lr {cfg['optim']['lr']}, weight decay {cfg['optim']['weight_decay']}; "
              f"schedule {cfg['schedule']['kind']} with {cfg['schedule']['warmup_steps']} warmup steps",
              f"- batch: {cfg['train']['micro_batch_size']} × {cfg['train']['grad_accum']} accumulation per rank; "
              f"{cfg['train']['dtype']}, ZeRO-{cfg['train']['zero_stage']}; seed {cfg['seed']}", ""]
    if recipe.lines:
        lines += [f"## {recipe.title}", "", *recipe.lines, ""]
    for stage in meta.get("stages", []):
        lines += [f"## Stage: {stage.get('name', '?')}", "", stage.get("summary", ""), ""]
    if meta.get("history"):  # relaunches that changed settings: the run is not what the settings above alone say
        lines += ["## Relaunches", "", "The run was resumed with changed settings (`override`: allowed explicitly "
                  "with checkpoint.allow_changes):", ""]
        lines += [f"- at step {h['step']}: " + "; ".join(f"`{c['key']}` {c['was']} → {c['now']} ({c['how']})"
                                                        for c in h["changes"]) for h in meta["history"]]
        lines.append("")
    rows = _metrics_rows(d, meta)
    if rows:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'tok = AutoTokenizer.from_pretrained("REPO_ID")',
              'model = AutoModelForCausalLM.from_pretrained("REPO_ID")', "```", ""]
    return "\n".join(lines)


DEFAULT_TIMEOUT = 60.0
STAGE_PREFIX = "slm_assist_push_"  # + "<pid>_<random>": the staging copies in tempfile.gettempdir()
_STAGE_RE = re.compile(re.escape(STAGE_PREFIX) + r"(\d+)_[^/]+")


def push(model_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, endpoint: str | None = None, token: str | None = None,
         timeout: float = DEFAULT_TIMEOUT, include_hidden: bool = False) -> str:
    """Upload the folder (plus a generated card) to `repo_id`; returns the commit (or PR) URL. `timeout` bounds each
    network operation (connect, each read or write), not the whole upload. Hidden entries (a name starting with '.',
    at any depth) are left out, and listed on stderr, unless `include_hidden`."""
    from httpx2 import InvalidURL, RequestError, TimeoutException, TransportError  # huggingface_hub's client
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    d = ModelDir.open(model_dir).path
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise UserError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    if not timeout > 0:
        raise UserError(f"--timeout {timeout}: expected a positive number of seconds")
    setting = "--endpoint " if endpoint else "HF_ENDPOINT="
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not re.match(r"https?://[^/?#]", endpoint, re.IGNORECASE):
        raise UserError(redact(f"{setting}{endpoint}: expected an http:// or https:// URL, such as "
                               "https://huggingface.co"))
    api = HfApi(endpoint=endpoint, token=token)
    if not (token or get_token()):
        raise UserError("no Hugging Face token: set HF_TOKEN (or run `hf auth login`) before pushing")
    card = None if (d / "README.md").is_file() else model_card(d).replace("REPO_ID", repo_id)
    card_data, note = data_card(ModelDir(d).meta(), d)
    if note:
        print(note, file=sys.stderr)
    remove_stale_staging()
    try:
        with _http_timeout(timeout), _redacted_hub_logs(), _staging_dir() as tmp:
            stage = tmp / d.name
            skipped: list[str] = []
            shutil.copytree(d, stage, copy_function=_stage_file,
                            ignore=None if include_hidden else _hidden(d, skipped))
            if skipped:
                print(f"left out {len(skipped)} hidden entr{'y' if len(skipped) == 1 else 'ies'} of {d} "
                      f"(--include-hidden uploads them): {', '.join(sorted(skipped))}", file=sys.stderr)
            if card is not None:
                (stage / "README.md").write_text(card, encoding="utf-8")
            if card_data:
                (stage / DATA_CARD_DIR).mkdir(exist_ok=True)
                for f in card_data:
                    _stage_file(str(f), str(stage / DATA_CARD_DIR / f.name))
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=stage, revision=revision, create_pr=create_pr,
                                     commit_message=f"Upload {d.parent.name} (slm_assist)")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise UserError(redact(f"hub {endpoint} rejected the push of {d} to {repo_id} (HTTP {status}): "
                               f"{_first_line(e)}; the local folder is unchanged")) from None
    except TimeoutException as e:  # connected (or connecting) but no answer; huggingface_hub re-raises it as is
        raise UserError(redact(f"hub endpoint {endpoint} did not answer within {timeout:g} s ({type(e).__name__}; "
                               "--timeout sets the limit); the local folder is unchanged")) from None
    except TransportError as e:  # connection refused, DNS: the hub was never reached
        raise UserError(redact(f"hub endpoint {endpoint} is unreachable ({type(e).__name__}: {_first_line(e)}); "
                               "check HF_ENDPOINT / --endpoint; the local folder is unchanged")) from None
    except (OSError, ValueError, RequestError, InvalidURL) as e:  # a bad answer (too many redirects), a bad port
        raise UserError(redact(f"push of {d} to {repo_id} via {endpoint} failed: {type(e).__name__}: "
                               f"{_first_line(e)}; the local folder is unchanged")) from None
    return info.pr_url or info.commit_url


@contextmanager
def _http_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared httpx2 client, as its current factory builds it (by default: its request hook,
    follow_redirects) but with `seconds` as the connect/read/write/pool timeout instead of none; the previous factory
    is restored after (set_client_factory closes the cached client, so the next call builds a fresh one)."""
    import httpx2
    from huggingface_hub.utils import _http, set_client_factory

    previous: Callable[[], httpx2.Client] = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


@contextmanager
def _redacted_hub_logs() -> Iterator[None]:
    """huggingface_hub's own log lines (its retry warnings name the request URL and the exception: `HTTP Error 503
    thrown while requesting POST https://user:token@...`) redacted like our messages, on the handlers of its logger
    (where hf prints them, and before they reach any handler of the root logger); removed after."""
    handlers = logging.getLogger("huggingface_hub").handlers
    redacting = _RedactFilter()
    for h in handlers:
        h.addFilter(redacting)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(redacting)


@contextmanager
def _staging_dir() -> Iterator[Path]:
    """A temp dir named `slm_assist_push_<pid>_*`, removed on exit, also when the process gets SIGTERM, SIGINT or
    SIGHUP meanwhile (turned into SystemExit / KeyboardInterrupt, so the removal runs; a second signal during the
    removal is ignored). The previous handlers are restored after."""
    with _signals_as_exceptions():
        tmp = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}_")
        try:
            yield Path(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield
        return
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:  # already unwinding: let the cleanup finish
            return
        fired = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        # only replace a handler that would end the process anyway: an ignored signal stays ignored, a caller's own
        # handler stays in charge
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def remove_stale_staging(tmp_dir: str | Path | None = None) -> list[Path]:
    """Remove the staging dirs (`slm_assist_push_<pid>_*`) of pushes whose process is gone (killed with SIGKILL, or
    the machine went down); returns them. Anything else in the temp dir, and the dirs of live processes, stay."""
    root = Path(tmp_dir or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        m = _STAGE_RE.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or _alive(int(m.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid we can ask about
        return True
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _stage_file(src: str, dst: str) -> None:
    """A file of the staging copy: hard-linked, or copied. A symlink is resolved first: a link kept as a link would
    point elsewhere (or nowhere) from the staging dir, and upload_folder silently skips a dangling one."""
    link_or_copy(os.path.realpath(src), dst)


def _hidden(root: Path, skipped: list[str]) -> Callable[[str, list[str]], list[str]]:
    """copytree's `ignore`: leaves out every name starting with '.', recording it (relative to `root`, a directory
    with a trailing '/') in `skipped`."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        hidden = [n for n in names if n.startswith(".")]
        rel = Path(directory).relative_to(root)
        skipped.extend((rel / n).as_posix() + "/" * os.path.isdir(os.path.join(directory, n)) for n in hidden)
        return hidden

    return ignore


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m slm_assist.hub", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="upload a save_pretrained folder with a generated model card")
    p.add_argument("model_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--endpoint", default=None, help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--include-hidden", action="store_true",
                   help="also upload hidden files and directories (any name starting with '.', at any depth, such "
                        "as .env); by default they are left out and their names printed. huggingface_hub itself "
                        "never uploads .git/ and refuses .cache/")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="the longest wait for each network operation (connecting, each read or write of a request), "
                        "not for the whole upload, so big uploads still work; a hub that stays silent this long is "
                        f"an error (default: {DEFAULT_TIMEOUT:g})")
    c = sub.add_parser("card", help="print the generated model card")
    c.add_argument("model_dir")
    args = ap.parse_args(list(argv))
    if args.cmd == "card":
        print(model_card(args.model_dir))
        return
    url = push(args.model_dir, args.repo_id, args.private, args.revision, args.create_pr, args.endpoint,
               timeout=args.timeout, include_hidden=args.include_hidden)
    print(redact(f"pushed {args.model_dir} to {args.repo_id}: {url}"))


if __name__ == "__main__":
    run_cli(main)
