"""The recipes by name: how a run's exported metadata (its `recipe`, written by the Trainer) finds the recipe's
own description for reports and model cards. The one module above both recipes that knows them both; the
recipes never import each other."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slm_assist.compress import report as compress_report
from slm_assist.compress.stages import RECIPE as COMPRESS
from slm_assist.core.errors import UserError
from slm_assist.core.run_dir import RecipeSummary
from slm_assist.salt import recipe as salt_recipe

DESCRIBE: dict[str, Callable[[dict[str, Any], Path], RecipeSummary]] = {
    salt_recipe.RECIPE: salt_recipe.describe,
    COMPRESS: compress_report.describe,
}


def describe(meta: dict[str, Any], run_dir: str | Path) -> RecipeSummary:
    """The recipe of a run from its exported metadata (one exported before runs named their recipe is SALT's:
    the only recipe that trained from a config with a `distill` section)."""
    name = meta.get("recipe", salt_recipe.RECIPE)
    if name not in DESCRIBE:
        raise UserError(f"{Path(run_dir)}: run metadata names recipe {name!r}, which this version does not know "
                        f"({', '.join(DESCRIBE)})")
    return DESCRIBE[name](meta, Path(run_dir))
