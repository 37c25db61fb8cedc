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
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_output_dir, check_output_dir
from slm_assist.core.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_fingerprint


def main(argv: Sequence[str]) -> None:
    cfg: PrepareConfig = load_prepare_config(
        argv, "python -m data_tools.tokenizer CONFIG [key=value ...]", description=__doc__,
        example="python -m data_tools.tokenizer configs/demo/data.yaml tokenizer.vocab_size=32000")
    out = Path(cfg.out_dir)
    target = out / TOKENIZER
    if (out / MANIFEST).is_file():  # a new tokenizer would make the packed data stale
        raise UserError(f"out_dir={out} holds a packed dataset; to change its tokenizer, pack it again with "
                        "`python -m data_tools.pack CONFIG overwrite=true` (it trains the tokenizer too)")
    check_output_dir(target, cfg.overwrite, field="out_dir")
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # a bad path fails before the corpus is read
    docs = list(read_documents(cfg.corpus))
    with atomic_output_dir(target, TOKENIZER_FILES, overwrite=cfg.overwrite, field="out_dir") as tmp:
        prepare_tokenizer(cfg.tokenizer, cfg.corpus, docs, tmp)
    tok = load_tokenizer(target)
    print(f"tokenizer: {target} (vocab {len(tok)}, fingerprint {tokenizer_fingerprint(tok)})")


if __name__ == "__main__":
    run_cli(main)
