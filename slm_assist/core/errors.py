"""One error type for bad user input, and the CLI wrapper that turns it into a clear message + exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (config, data, paths). Printed without a traceback; exit code 2."""


class ConfigError(UserError):
    """An unknown config key or a bad config value."""


def brief(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, cut to `limit` characters: the cause inside one error line."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point: a UserError prints `error: ...` on stderr and exits 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: outputs are atomic, so there is nothing to report but the interruption
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
