"""The SALT benchmark's derived figures: steps to reach a target loss (interpolated) and the profile check."""

from __future__ import annotations

import sys

import pytest

from slm_assist.training.metrics import steps_to_reach

from .conftest import REPO, clean_env


def test_steps_to_reach_interpolates_between_evals():
    curve = [(50, 5.0), (100, 4.0), (150, 3.5), (200, 3.4)]
    assert steps_to_reach(curve, 4.0) == 100
    assert steps_to_reach(curve, 3.75) == pytest.approx(125.0)
    assert steps_to_reach(curve, 6.0) == 50  # already below at the first eval
    assert steps_to_reach(curve, 3.0) is None  # never reached
    assert steps_to_reach([(50, 5.0), (100, 5.0), (150, 4.0)], 5.0) == 50


def test_profiles_end_on_an_eval():
    """bench/salt.py refuses to run a profile whose last step is not an evaluation."""
    import subprocess

    res = subprocess.run([sys.executable, str(REPO / "bench" / "salt.py"), "--check"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "profiles ok: full, quick" in res.stdout
