"""`python -m data_tools.tokenizer CONFIG [key=value ...]`: only the tokenizer step of `data_tools.pack`.

Trains (or copies) the tokenizer of a pack config into `<out_dir>/tokenizer`; a later `data_tools.pack` with the
same out_dir reuses it. The training itself is in tokenizer_training.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_tools.corpus import read_documents
from data_tools.pack import PrepareConfig, load_prepare_config
from data_tools.tokenizer_training import prepare_tokenizer
from slm_assist.core.dataset import MANIFEST, TOKENIZER
from slm_assist.core.errors import run_cli
from slm_assist.core.files import atomic_output_dir
from slm_assist.core.tokenizer import load_tokenizer, tokenizer_fingerprint


def main(argv: Sequence[str]) -> None:
    cfg: PrepareConfig = load_prepare_config(argv, "python -m data_tools.tokenizer CONFIG [key=value ...]")
    target = Path(cfg.out_dir) / TOKENIZER
    with atomic_output_dir(target, overwrite=cfg.overwrite) as tmp:
        prepare_tokenizer(cfg.tokenizer, read_documents(cfg.corpus), tmp)
    (Path(cfg.out_dir) / MANIFEST).unlink(missing_ok=True)  # data packed with an old tokenizer is stale
    tok = load_tokenizer(target)
    print(f"tokenizer: {target} (vocab {len(tok)}, fingerprint {tokenizer_fingerprint(tok)})")


if __name__ == "__main__":
    run_cli(main)
