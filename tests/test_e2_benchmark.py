"""Tests for benchmarks/e2_acquisition_shifts.py helpers: the evaluation cache, the monitor's flags
and the comparison with earlier results (synthetic profiles; the full run is the benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2_acquisition_shifts as e2  # noqa: E402
from monitor.spectrum import SpectralProfiler  # noqa: E402


def _profiles(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two well-separated spectral groups on a 2-D latent plane (k = 2), intensity features as noise."""
    profiler = SpectralProfiler()
    d, s = len(profiler.feature_names), profiler.n_spectral
    X = rng.normal(0, 1, size=(n, d))
    latent = rng.normal(0, 1, size=(n, 2))
    latent[: n // 2, 0] += 8.0
    X[:, :s] = latent @ np.random.default_rng(99).normal(size=(2, s)) + rng.normal(0, 0.05, size=(n, s))
    return X


def test_monitor_flags_a_shifted_half_and_not_the_clean_one() -> None:
    rng = np.random.default_rng(0)
    n = 240
    clean = _profiles(rng, n)
    intensity = np.array([name.startswith("intensity_") for name in SpectralProfiler().feature_names])
    shifted = clean.copy()
    shifted[:, intensity] += 3.0  # a photometric change: the spectrum is untouched
    P = np.stack([clean, shifted], axis=1)
    y = np.arange(n) % 2
    failures = (rng.random(n) < 0.2).astype(int)
    out = e2.monitor_flags(P, failures, y, [e2.CLEAN, ("bright", "strong")], n_windows=10, window=60)
    assert [(r["kind"], r["n_reference"], r["n_held_out"]) for r in out] == [
        ("clean", 120, 120),
        ("bright", 120, 120),
    ]
    assert out[0]["window_flagged"] <= 0.1
    assert out[1]["window_flagged"] == 1.0 and out[1]["component_flagged"]["intensity"] == 1.0
    assert out[1]["component_flagged"]["cluster_mix"] <= 0.1  # clusters see the spectrum only


def test_evaluation_is_cached_by_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = e2.evaluate_condition
    monkeypatch.setattr(e2, "evaluate_condition", lambda *a: calls.append(a[-1]) or real(*a))
    rng = np.random.default_rng(1)
    n, conds = 60, [e2.CLEAN, ("blur", "strong")]
    P = np.stack([_profiles(rng, n), _profiles(rng, n)], axis=1)
    F = {"profile": P, "stats": rng.normal(size=(n, 2, 10))}
    y = np.arange(n) % 2
    p_all = rng.random((n, 2))
    idx = {c: i for i, c in enumerate(conds)}
    args = (idx, F, y, p_all, 0.3, 2, tmp_path, "code-a")
    first = e2._run_one(conds[1], 0, *args)
    assert first["n"] == 60 and first["n_shifted"] == 18 and first["seed"] == 0
    again = e2._run_one(conds[1], 0, *args)
    assert (first["from_cache"], again["from_cache"], calls) == (False, True, [0])  # read back, not evaluated
    again["from_cache"] = False
    assert json.dumps(again) == json.dumps(first)  # the same result, nan included
    e2._run_one(conds[1], 0, *args[:-1], "code-b")  # other code: evaluated again
    e2._run_one(conds[1], 1, *args)  # other seed: another subset
    assert calls == [0, 0, 1] and len(list((tmp_path / "e2-runs").iterdir())) == 3


def test_v1_comparison_pairs_rows_present_in_both() -> None:
    def run(kind: str, seed: int, v: float) -> dict:
        methods = dict.fromkeys(e2.METHODS, v)
        pr = {"spectral": {"precision": v, "recall": v}, "intensity": {"precision": v, "recall": v}}
        ins = {"k": 2, "cramers_v_failure": v, "chi2_p_failure": v, "cramers_v_shifted": v,
               "n_blind_spot_clusters": 1, "blind_spot_vs_shifted": {"precision": v, "recall": v}}  # fmt: skip
        return {
            "kind": kind, "level": "strong", "seed": seed, "failure_rate": v, "failure_rate_shifted": v,
            "failure_rate_clean_part": v, "auroc_failure": methods, "auroc_shifted": methods,
            "blind_spot_vs_shifted_oof": pr, "in_sample": {"spectral": ins, "intensity": ins},
        }  # fmt: skip

    before = {
        "meta": {"seeds": 1},
        "summary": e2.summarise([run("blur", 0, 0.5), run("gamma", 0, 0.4)]),
        "classifier": [{"kind": "blur", "level": "strong", "accuracy": 0.7}],
    }
    runs = [run("blur", 0, 0.5), run("blur", 1, 0.7), run("gamma", 0, 0.9), run("bright", 0, 0.8)]
    out = e2.v1_comparison(
        before, e2.summarise(runs), [{"kind": "blur", "level": "strong", "accuracy": 0.75}], runs
    )
    assert [(r["kind"], r["level"]) for r in out] == [("blur", "strong")]  # gamma's levels changed
    before_v, same_seed, mean, sd = out[0]["failure_auroc_spectral"]
    assert (before_v, same_seed, round(mean, 9), round(sd, 9)) == (0.5, 0.5, 0.6, 0.1)
    assert out[0]["accuracy"][:3] == (0.7, 0.75, 0.75)
