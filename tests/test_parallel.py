"""Local multi-core profiling (monitor.parallel) and the CLI's --jobs: same results, input order,
bounded work in flight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monitor.cli import main
from monitor.parallel import profile_stream
from monitor.spectrum import SpectralProfiler

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "default"
SPEC = SpectralProfiler(working_size=128).spec()


@pytest.fixture(scope="module")
def files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """12 NIH images and one unreadable file in the middle."""
    images = sorted((data_dir / "nih" / "images").iterdir())[:12]
    bad = tmp_path_factory.mktemp("bad") / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = [str(p) for p in images]
    out.insert(5, str(bad))
    return out


def test_two_processes_give_the_same_profiles_in_input_order(files: list[str]) -> None:
    one = list(profile_stream(files, SPEC, jobs=1))
    two = list(profile_stream(files, SPEC, jobs=2, chunk_size=2))
    assert [r.index for r in two] == list(range(len(files)))
    assert [r.source for r in two] == files
    assert two[5].profile is None and "broken.png" in two[5].error
    for a, b in zip(one, two, strict=True):
        assert a.error == b.error
        if a.profile is not None:
            np.testing.assert_array_equal(a.profile, b.profile)
            assert a.meta == b.meta


def test_sources_are_read_lazily_and_work_in_flight_is_bounded(files: list[str]) -> None:
    """However many sources, only a window of chunks is pulled ahead of what was yielded."""
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield files[i % 3]
            i += 1

    stream = profile_stream(endless(), SPEC, jobs=2, chunk_size=2, window=3)
    first = [next(stream) for _ in range(4)]
    stream.close()
    assert [r.index for r in first] == [0, 1, 2, 3]
    # 3 chunks of 2 in flight, refilled one chunk per chunk taken (2 taken), plus one being formed.
    assert len(pulled) <= (3 + 2) * 2 + 1


def test_jobs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="jobs"):
        next(profile_stream([], SPEC, jobs=0))


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_score_and_drift_with_jobs_match_one_process(
    files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model", str(MODEL), *files, "--json"]
    code1, out1, err1 = _run(capsys, ["score", *base, "--jobs", "1"])
    code2, out2, err2 = _run(capsys, ["score", *base, "--jobs", "2"])
    assert code1 == code2 == 1  # one unreadable file: partial
    assert out1 == out2
    assert [json.loads(line)["image"] for line in out2.splitlines()] == files[:5] + files[6:]
    assert err1 == err2 and "broken.png" in err2
    d1 = _run(capsys, ["drift", *base, "--jobs", "1"])
    d2 = _run(capsys, ["drift", *base, "--jobs", "auto"])
    assert d1[1] == d2[1] and json.loads(d2[1])["n_images"] == 12


def test_cli_profile_with_jobs(files: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code1, out1, _ = _run(capsys, ["profile", *files[:8], "--json", "--jobs", "1"])
    code2, out2, _ = _run(capsys, ["profile", *files[:8], "--json", "--jobs", "2"])
    assert code1 == code2 == 1 and out1 == out2 and len(out2.splitlines()) == 7


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_jobs_is_a_usage_error(value: str, files: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, ["profile", files[0], "--jobs", value])
    assert code == 3 and "--jobs" in err


def test_workers_start_before_the_first_result_is_asked_for(files: list[str]) -> None:
    """The caller loads its model while the workers profile: work is handed out on the call."""
    pulled = []

    def sources():
        for f in files[:8]:
            pulled.append(f)
            yield f

    stream = profile_stream(sources(), SPEC, jobs=2, chunk_size=2)
    assert len(pulled) == 8  # every chunk submitted before any next()
    assert [r.index for r in stream] == list(range(8))
