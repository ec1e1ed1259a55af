"""Profiling and fitting on a real Dask LocalCluster (2 worker processes): the same results
as local runs, a Parquet cache reused across runs, and nothing lost when a worker is killed."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from monitor.fitting import fit_folder
from monitor.parallel import profile_stream
from monitor.spectrum import SpectralProfiler

distributed = pytest.importorskip("distributed")

from monitor.distributed import DaskRunner  # noqa: E402
from monitor.profilestore import ParquetProfileStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = SpectralProfiler(working_size=128).spec()


@pytest.fixture(scope="module")
def runner() -> DaskRunner:
    r = DaskRunner.connect("local", n_workers=2, timeout=60)
    r.client.wait_for_workers(2, timeout=120)
    yield r
    r.close()


@pytest.fixture(scope="module")
def nih(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    rows = list(csv.DictReader((data_dir / "nih" / "labels.csv").open()))[:40]
    cols = [c for c in rows[0] if c.startswith("chexnet_")]
    out = tmp_path_factory.mktemp("dask") / "outcomes.csv"
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "score", "view"])
        for r in rows:
            score = max(float(r[c]) for c in cols)
            w.writerow([r["image"], int(r["findings"] != "No Finding"), f"{score:.6f}", r["view"]])
    images = data_dir / "nih" / "images"
    return images, out, [str(images / r["image"]) for r in rows]


def test_dask_profiles_equal_local_ones_and_the_parquet_cache_is_reused(
    runner: DaskRunner, nih, tmp_path: Path
) -> None:
    _, _, files = nih
    sources = files[:10] + [str(tmp_path / "missing.png")] + ["file://" + files[10]]
    local = list(profile_stream(sources, SPEC, jobs=1))
    first = list(runner.profile_stream(sources, SPEC, cache_dir=tmp_path, batch_size=3))
    again = list(runner.profile_stream(sources, SPEC, cache_dir=tmp_path, batch_size=5))
    assert [r.source for r in first] == sources
    assert "missing.png" in first[10].error and first[10].profile is None
    for a, b, c in zip(local[:10], first[:10], again[:10], strict=True):
        np.testing.assert_array_equal(a.profile, b.profile)
        np.testing.assert_array_equal(a.profile, c.profile)
        assert a.meta == b.meta == c.meta
    (plain,) = profile_stream(files[10:11], SPEC, jobs=1)
    np.testing.assert_array_equal(first[11].profile, plain.profile)
    assert not any(r.cached for r in first[:10])
    assert all(r.cached for r in again[:10] + [again[11]])
    table = ParquetProfileStore.in_cache_dir(tmp_path, SPEC).read_all()
    # 11 distinct files; the file:// URL is the same content as a plain path: one row.
    assert table.num_rows == 11
    assert len(set(table.column("sha256").to_pylist())) == 11


def test_a_url_and_a_path_of_the_same_file_give_the_same_profile(runner: DaskRunner, nih) -> None:
    _, _, files = nih
    a, b = runner.profile_stream([files[0], "file://" + files[0]], SPEC)
    np.testing.assert_array_equal(a.profile, b.profile)


def test_distributed_fit_gives_the_same_model_as_a_local_fit(runner: DaskRunner, nih, tmp_path: Path) -> None:
    images, outcomes, _ = nih
    kw = dict(n_clusters="auto", k_max=3, min_cluster_size=0.1, seed=3, working_size=128)
    local = fit_folder(images, outcomes, tmp_path / "local", jobs=1, cache_dir=None, **kw)
    dask = fit_folder(images, outcomes, tmp_path / "dask", cache_dir=tmp_path / "cache", runner=runner, **kw)
    warm = fit_folder(images, outcomes, tmp_path / "warm", cache_dir=tmp_path / "cache", runner=runner, **kw)
    assert local.model.model_id == dask.model.model_id == warm.model.model_id
    assert warm.cache_hits == 40 and dask.cache_hits == 0
    np.testing.assert_array_equal(local.model.fit_profiles, dask.model.fit_profiles)
    assert local.model.rates.to_json() == dask.model.rates.to_json()


def test_local_and_dask_fits_share_one_profile_cache(runner: DaskRunner, nih, tmp_path: Path) -> None:
    images, outcomes, _ = nih
    kw = dict(k_max=3, min_cluster_size=0.1, seed=3, working_size=128)
    dask_first = tmp_path / "dask-first"
    dask = fit_folder(images, outcomes, tmp_path / "m1", cache_dir=dask_first, runner=runner, **kw)
    local = fit_folder(images, outcomes, tmp_path / "m2", cache_dir=dask_first, jobs=1, **kw)
    assert (dask.cache_hits, local.cache_hits) == (0, 40)
    local_first = tmp_path / "local-first"
    local = fit_folder(images, outcomes, tmp_path / "m3", cache_dir=local_first, jobs=1, **kw)
    dask = fit_folder(images, outcomes, tmp_path / "m4", cache_dir=local_first, runner=runner, **kw)
    assert (local.cache_hits, dask.cache_hits) == (0, 40)
    assert dask.model.model_id == local.model.model_id
    # The fits' temporary fit sets are gone; the cache is one Parquet dataset, nothing else.
    assert not (local_first / "fits").exists() or not any((local_first / "fits").iterdir())
    assert {p.suffix for p in local_first.rglob("*") if p.is_file()} <= {".parquet", ".txt"}


def test_a_sampled_fit_assigns_partitions_on_the_workers(runner: DaskRunner, nih, tmp_path: Path) -> None:
    from monitor.model import ReliabilityModel
    from monitor.profilestore import ParquetFitSet

    images, outcomes, _ = nih
    kw = dict(k_max=3, min_cluster_size=0.1, seed=3, working_size=128, max_fit_profiles=25)
    local = fit_folder(images, outcomes, tmp_path / "local", jobs=1, cache_dir=tmp_path / "c", **kw)
    dask = fit_folder(images, outcomes, tmp_path / "dask", cache_dir=tmp_path / "c", runner=runner, **kw)
    assert local.model.card["fit_sample"] == {"n_profiles": 40, "n_clustered": 25}
    assert dask.model.model_id == local.model.model_id
    assert dask.model.rates.to_json() == local.model.rates.to_json()
    np.testing.assert_allclose(dask.model.cluster_feature_std, local.model.cluster_feature_std, atol=1e-12)
    # The client reads only the sample: every partition is read and summed on a worker.
    X = local.model.fit_profiles
    writer = ParquetFitSet.writer(tmp_path / "fitset", X.shape[1], partition_rows=5)
    for i, row in enumerate(np.vstack([X, X + 0.01])):
        writer.append(row, i % 2, {"image": f"{i}.png"})
    fit_set = writer.close()
    from monitor.clustering import SpectralClusterer

    model = ReliabilityModel.fit_streamed(
        fit_set,
        profiler=local.model.profiler,
        clusterer=SpectralClusterer(n_clusters=2, random_state=0),
        max_fit_profiles=20,
        map_partitions=runner.map,
    )
    assert fit_set.rows_read == 20 and model.rates.counts_.sum() == 50


def test_a_worker_killed_mid_run_loses_nothing(runner: DaskRunner, nih) -> None:
    _, _, files = nih
    sources = files[:30]
    expected = list(profile_stream(sources, SPEC, jobs=1))
    pids = runner.client.run(os.getpid)
    stream = runner.profile_stream(sources, SPEC, batch_size=1)
    got = [next(stream)]
    # Kill one worker process outright (no clean shutdown) while most batches are pending.
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    got.extend(stream)
    assert [r.index for r in got] == list(range(30))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.profile, b.profile)
    # The nanny restarted the killed worker: the cluster is whole again for later tests.
    runner.client.wait_for_workers(2, timeout=120)
    assert victim not in runner.client.run(os.getpid).values()


def test_cli_profile_score_and_drift_on_a_local_dask_cluster_match_local_runs(
    nih, capsys: pytest.CaptureFixture[str]
) -> None:
    from monitor.cli import main

    _, _, files = nih
    model = str(REPO / "models" / "default")
    for command in ("profile", "score", "drift"):
        argv = [command, *files[:8], "--json"] + (["--model", model] if command != "profile" else [])
        assert main([*argv, "--jobs", "1"]) == 0
        local = capsys.readouterr().out
        assert main([*argv, "--scheduler", "local", "--jobs", "2"]) == 0
        assert capsys.readouterr().out == local
