"""Prometheus rules of deploy/prometheus: promtool checks and unit tests, and their coverage.

promtool comes with Debian's ``prometheus`` package (``bash scripts/ensure-prometheus.sh``);
without it these tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"

#: The alerts the deployment promises (deploy/README.md documents each).
EXPECTED_ALERTS = {
    "CXRMonitorDrift",
    "CXRMonitorNoveltySurge",
    "CXRMonitorOutOfScopeTraffic",
    "CXRMonitorReliabilityDrop",
    "CXRMonitorBlindSpotTraffic",
    "CXRMonitorRealizedFailureRate",
    "CXRMonitorNoTraffic",
    "CXRMonitorHighErrorRate",
    "CXRMonitorHighLatency",
    "CXRMonitorDown",
}


def _skip_or_fail(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _skip_or_fail(
            "promtool not found on PATH: install Debian's prometheus package (scripts/ensure-prometheus.sh)"
        )
    return str(path)


def _yaml(path: Path) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        _skip_or_fail("PyYAML is not installed (pip install pyyaml): it parses the deployment files")
    with path.open() as fh:
        return yaml.safe_load(fh)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def _alert_rules() -> list[dict]:
    return [r for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


# --------------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    proc = _run(_promtool(), "check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = _run(_promtool(), "test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_check_config() -> None:
    """prometheus.yml parses and its rule_files resolve (promtool checks them too)."""
    proc = _run(_promtool(), "check", "config", str(CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are sensitive to the thresholds: raising the fleet PSI threshold breaks them."""
    text = ALERTS.read_text()
    mutated, n = re.subn(r"cluster_mix_psi:rate15m > 0\.2\b", "cluster_mix_psi:rate15m > 5", text)
    assert n == 1, "fleet PSI threshold not found in alerts.yml"
    suite = _yaml(ALERTS_TEST)  # skips without PyYAML
    import yaml

    suite["tests"] = [t for t in suite["tests"] if t["name"].startswith("fleet cluster mix far")]
    assert len(suite["tests"]) == 1
    (tmp_path / "alerts.yml").write_text(mutated)
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(suite, sort_keys=False))
    proc = _run(_promtool(), "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert proc.returncode != 0
    assert "CXRMonitorDrift" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- rule content


def test_every_promised_alert_is_defined() -> None:
    assert {r["alert"] for r in _alert_rules()} == EXPECTED_ALERTS


@pytest.mark.parametrize("field", ["summary", "description", "runbook"])
def test_alerts_have_annotations(field: str) -> None:
    for rule in _alert_rules():
        assert rule.get("annotations", {}).get(field), f"{rule['alert']} has no {field} annotation"


def test_alerts_have_for_and_severity() -> None:
    for rule in _alert_rules():
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']} has no for: duration"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_runbook_anchors_exist_in_readme() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    # GitHub anchors of "### CXRMonitorDrift" headings are the lower-cased names.
    anchors = {m.lower() for m in re.findall(r"^#+\s+(CXRMonitor\w+)\s*$", readme, flags=re.MULTILINE)}
    for rule in _alert_rules():
        link = rule["annotations"]["runbook"]
        assert link.startswith("deploy/README.md#"), link
        assert link.split("#", 1)[1] in anchors, f"{link}: no such heading in deploy/README.md"


def test_each_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts_test.yml covers every alert both ways: some case expects it, some expects silence."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in _yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS
