"""Rebuild pydoc_demo.jsonl.gz: the reST sources of the Python 3.11 documentation (PSF licence), one JSON
line per source file. Needs Debian's python3.11-doc package:

    apt-get install -y --no-install-recommends python3.11-doc
    python data_tools/demo_corpus/build.py

Deterministic: files are taken in sorted path order from the sections below until MAX_BYTES of text.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ("tutorial", "howto", "faq", "reference", "library")
MAX_BYTES = 6_000_000
OUT = Path(__file__).with_name("pydoc_demo.jsonl.gz")


def main() -> None:
    if not SOURCES.is_dir():
        sys.exit(f"{SOURCES} not found: apt-get install -y --no-install-recommends python3.11-doc")
    total, n = 0, 0
    # mtime=0 keeps the gzip bytes identical across rebuilds.
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for section in SECTIONS:
            for path in sorted((SOURCES / section).rglob("*.rst.txt")):
                text = path.read_text(encoding="utf-8").strip()
                if total + len(text) > MAX_BYTES:
                    break
                rel = str(path.relative_to(SOURCES))
                f.write((json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n").encode())
                total += len(text)
                n += 1
    print(f"wrote {OUT}: {n} documents, {total / 1e6:.2f} MB of text")


if __name__ == "__main__":
    main()
