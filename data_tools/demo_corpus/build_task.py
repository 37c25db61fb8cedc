"""Rebuild perldoc_task.jsonl.gz: the demo's task corpus for compression, the first Perl pod pages of the shared
perldoc corpus (perl-doc, Artistic or GPL-1+; see PERL_LICENSE), one JSON line per `=head1` section (enough
documents for a held-out split). The shared file keeps blank lines between paragraphs, so sections are
re-assembled at each `=head1`.

    python data_tools/demo_corpus/build_task.py [PATH_TO/train_perldoc.txt.gz]

Deterministic: sections in file order until MAX_BYTES of text.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "train_perldoc.txt.gz"
MAX_BYTES = 700_000
OUT = Path(__file__).with_name("perldoc_task.jsonl.gz")


def sections(text: str) -> list[str]:
    out: list[list[str]] = []
    for para in text.split("\n\n"):
        if para.startswith("=head1 ") or not out:
            out.append([])
        out[-1].append(para)
    return ["\n\n".join(p).strip() for p in out]


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not src.is_file():
        sys.exit(f"{src} not found: pass the path of train_perldoc.txt.gz")
    total, n = 0, 0
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for doc in sections(gzip.decompress(src.read_bytes()).decode("utf-8")):
            if total + len(doc) > MAX_BYTES:
                break
            f.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode())
            total, n = total + len(doc), n + 1
    print(f"wrote {OUT}: {n} sections, {total / 1e6:.2f} MB of text")


if __name__ == "__main__":
    main()
