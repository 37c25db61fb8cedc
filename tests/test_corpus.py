from __future__ import annotations

import gzip
import json

import pytest

from data_tools.corpus import CorpusConfig, read_documents
from slm_assist.core.config import load_config
from slm_assist.core.errors import UserError


def docs(*overrides: str) -> list[str]:
    return list(read_documents(load_config(CorpusConfig, None, list(overrides))))


def test_plain_text_blank_line_documents(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nline two\n\n\nsecond doc\n\nthird\n")
    assert docs(f"paths=[{p}]") == ["first doc\nline two", "second doc", "third"]


def test_gzip_text_and_max_docs(tmp_path):
    p = tmp_path / "c.txt.gz"
    with gzip.open(p, "wt") as f:
        f.write("a\n\nb\n\nc\n")
    assert docs(f"paths=[{p}]", "max_docs=2") == ["a", "b"]


def test_jsonl_parquet_and_datasets_dir(tmp_path):
    import datasets

    rows = [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}]
    j = tmp_path / "c.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (j, tmp_path / "c.parquet", tmp_path / "ds"):
        assert docs(f"paths=[{path}]") == ["alpha", "beta"], path


def test_embedded_demo_corpus_is_default():
    first = docs("max_docs=3")
    assert len(first) == 3 and all(len(d) > 100 for d in first)


def test_empty_corpus_is_an_error(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n   \n")
    with pytest.raises(UserError, match=r"empty corpus.*empty\.txt"):
        docs(f"paths=[{p}]")


def test_non_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine\n\nok line\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"bad\.txt:4: not valid UTF-8.*column 5.*on_decode_error=replace"):
        docs(f"paths=[{p}]")
    assert docs(f"paths=[{p}]", "on_decode_error=replace") == ["fine", "ok line\nbad \ufffd byte"]


def test_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: missing field 'text'"):
        docs(f"paths=[{p}]")
    with pytest.raises(UserError, match=r"c\.jsonl:1: missing field 'body'"):
        docs(f"paths=[{p}]", "text_field=body")


def test_missing_column_in_parquet(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"body": "x"}]).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(UserError, match=r"c\.parquet: missing field 'text'.*body"):
        docs(f"paths=[{tmp_path / 'c.parquet'}]")


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*nope\.txt"):
        docs(f"paths=[{tmp_path / 'nope.txt'}]")
