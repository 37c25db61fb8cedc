"""The SALT benchmark's derived figures: steps to reach a target loss (interpolated) and the regime check."""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def salt_bench():
    spec = importlib.util.spec_from_file_location("bench_salt", REPO / "bench" / "salt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_steps_to_reach_interpolates_between_evals(salt_bench):
    curve = [(50, 5.0), (100, 4.0), (150, 3.5), (200, 3.4)]
    assert salt_bench.steps_to_reach(curve, 4.0) == 100
    assert salt_bench.steps_to_reach(curve, 3.75) == pytest.approx(125.0)
    assert salt_bench.steps_to_reach(curve, 6.0) == 50  # already below at the first eval
    assert salt_bench.steps_to_reach(curve, 3.0) is None  # never reached
    assert salt_bench.steps_to_reach([(50, 5.0), (100, 5.0), (150, 4.0)], 5.0) == 50


def test_profiles_end_on_an_eval(salt_bench):
    for p in salt_bench.PROFILES.values():
        assert p["steps"] % p["eval_every"] == 0  # the last eval is the final step
