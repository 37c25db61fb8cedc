from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_tools.corpus import CorpusConfig, read_documents
from data_tools.pack import PrepareConfig, is_validation_doc, pack_token_stream, prepare
from slm_assist.core.config import load_config
from slm_assist.core.dataset import load_split, read_manifest
from slm_assist.core.errors import UserError
from slm_assist.core.tokenizer import load_tokenizer, tokenizer_fingerprint

from .conftest import run_module


def _stream(docs_ids, eos):
    return [t for d in docs_ids for t in (*d, eos)]


def test_pack_token_stream_places_eos_and_counts():
    rows, dropped = pack_token_stream([[5, 6, 7], [8], [9, 10]], eos_id=1, seq_len=4)
    assert rows.tolist() == [[5, 6, 7, 1], [8, 1, 9, 10]]
    assert dropped == 1  # the final EOS did not fill a row


def test_validation_split_is_deterministic_and_near_fraction():
    picks = [is_validation_doc(i, seed=0, fraction=0.1) for i in range(5000)]
    assert picks == [is_validation_doc(i, seed=0, fraction=0.1) for i in range(5000)]
    assert 0.08 < sum(picks) / 5000 < 0.12
    assert picks != [is_validation_doc(i, seed=1, fraction=0.1) for i in range(5000)]


def test_packed_dataset_matches_documents(tiny_data, tiny_corpus):
    """Token counts, EOS placement, the by-document split and the manifest, checked against the raw corpus."""
    manifest = read_manifest(tiny_data)
    tok = load_tokenizer(tiny_data / "tokenizer")
    docs = list(read_documents(load_config(CorpusConfig, None, [f"paths=[{tiny_corpus}]"])))
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    val_mask = [is_validation_doc(i, 0, 0.1) for i in range(len(docs))]
    assert any(val_mask) and not all(val_mask)
    seq_len = 32
    for split, want in (("train", False), ("validation", True)):
        expected = _stream([d for d, v in zip(ids, val_mask) if v == want], tok.eos_token_id)
        rows = np.asarray(load_split(tiny_data, split)["input_ids"])
        assert rows.shape[1] == seq_len
        n = len(expected) // seq_len
        # exactly the split's documents, in order, each followed by EOS; only the short tail is dropped
        assert rows.reshape(-1).tolist() == expected[: n * seq_len]
        info = manifest["splits"][split]
        assert info == {"documents": val_mask.count(want), "sequences": n, "tokens": n * seq_len,
                        "dropped_tail_tokens": len(expected) - n * seq_len}
    assert manifest["seq_len"] == seq_len
    assert manifest["vocab_size"] == len(tok) == 400
    assert manifest["eos_token_id"] == tok.eos_token_id
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)


def test_hf_tokenizer_matches_sentencepiece(tiny_data, tiny_corpus):
    import sentencepiece as spm

    tok = load_tokenizer(tiny_data / "tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer" / "sentencepiece.model"))
    texts = list(read_documents(load_config(CorpusConfig, None, [f"paths=[{tiny_corpus}]"])))[:10]
    texts.append("def f(x):\n    return  x + 1\t# naïve 🤖")
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text  # whitespace and unknown characters survive (byte fallback)


def test_existing_hf_tokenizer_is_reused(tiny_data, tmp_path):
    cfg = load_config(PrepareConfig, None, [f"out_dir={tmp_path / 'd'}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                            "corpus.max_docs=20", "pack.seq_len=16", "pack.val_fraction=0.3"])
    manifest = prepare(cfg)
    assert manifest["tokenizer_fingerprint"] == read_manifest(tiny_data)["tokenizer_fingerprint"]


def test_refuses_to_overwrite_without_flag(tiny_data, tmp_path):
    out = tmp_path / "d"
    args = [f"out_dir={out}", f"tokenizer.path={tiny_data / 'tokenizer'}", "corpus.max_docs=20", "pack.seq_len=16", "pack.val_fraction=0.3"]
    prepare(load_config(PrepareConfig, None, args))
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match=r"out_dir=.*exists and is not empty.*overwrite=true"):
        prepare(load_config(PrepareConfig, None, args))
    assert (out / "manifest.json").read_text() == before  # the complete dataset is untouched
    prepare(load_config(PrepareConfig, None, [*args, "overwrite=true"]))


def test_too_small_split_is_an_error(tiny_data, tmp_path):
    cfg = load_config(PrepareConfig, None, [f"out_dir={tmp_path / 'd'}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                            "corpus.max_docs=2", "pack.seq_len=100000"])
    with pytest.raises(UserError, match=r"split 'train'.*pack\.seq_len=100000"):
        prepare(cfg)
    assert not (tmp_path / "d" / "manifest.json").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "empty corpus"),
    (b"ok\n\n\xc3\x28 broken\n", r"bad\.txt:3: not valid UTF-8"),
])
def test_cli_bad_corpus_exits_nonzero_with_message(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    res = run_module("data_tools.pack", ["configs/demo/data.yaml", f"corpus.paths=[{bad}]", f"out_dir={out}"])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert re.search(message, res.stderr), res.stderr
    assert not (out / "manifest.json").exists()


def test_cli_tokenizer_command(tmp_path):
    res = run_module("data_tools.tokenizer", ["configs/demo/data.yaml", f"out_dir={tmp_path}", "corpus.max_docs=5",
                                              "tokenizer.vocab_size=600"])
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert len(tok) == 600 and tokenizer_fingerprint(tok) in res.stdout
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
