"""A few seconds of the soak benchmark (benchmarks/soak.py) in every test run: runs back to back,
spectra and frames, no unaccounted loss, no file descriptors or threads left behind."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_soak():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("beamlens_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_soak_accounts_for_everything(capsys):
    result = load_soak().soak(runs=8, points=100, frames_per_run=300, frame_px=32)
    assert result["events_processed"] == 4 * 100 and result["frames_processed"] == 4 * 300
    assert result["unaccounted_losses"] == 0
    assert result["events_missing"] == 0 and result["frames_dropped"] == 0
    assert result["fds_growth"] <= 0 and result["threads_growth"] <= 0
