"""End to end: a real Prometheus scrapes a real sidecar and evaluates deploy/prometheus/alerts.yml.

The sidecar (``cxr-monitor serve``) and Prometheus (Debian's package: scrape and
evaluation every second, storage in a temporary directory, loopback ports) run as
subprocesses. The sidecar serves a model fitted by ``cxr-monitor fit`` in the test on
three quarters of the NIH images, with the bundled model's task and threshold (its
outcomes table, ``models/default-outcomes.csv``). The rules are the repository's, with
every ``for:`` cut to 1 s and the image-count guards lowered to what the test sends;
thresholds are unchanged.

1. In-distribution traffic: the held-out quarter of the NIH images (every 4th file,
   not seen by the fit). CXRMonitorDrift and CXRMonitorNoveltySurge must never be
   pending or firing.
2. Drifted traffic: the first 300 Kermany test images in sorted order (paediatric
   radiographs, all 234 of the NORMAL folder and 66 PNEUMONIA: another population,
   scanners and 224x224 JPEG), so that they are two thirds of the fleet's 15 minutes.
   CXRMonitorDrift must fire, from the replica's window and fleet-wide.
3. Out-of-scope traffic: 40 DICOMs whose header says ultrasound (NIH pixels inside), 8% of
   the fleet's 15 minutes. CXRMonitorOutOfScopeTraffic must fire and the window's out_of_scope
   drift component with it.

The Grafana-managed twins of the alerts (deploy/grafana/provisioning/alerting/
cxr-monitor-rules.yaml) are evaluated against the same Prometheus at both steps: each rule's
queries are run as Grafana runs them (instant queries at the evaluation time), its server-side
expressions are applied with Grafana's semantics (``grafana_condition``), and the series for
which its condition holds must be exactly those of the Prometheus twin's pending or firing
alerts at the same evaluation timestamp: quiet on NIH, firing for drift on Kermany and for
out-of-scope traffic on the ultrasound DICOMs. (No Grafana
runs here: the expression semantics are the test's, documented in ``grafana_condition``; the
``for`` durations are equal by construction, checked in tests/test_deploy.py.)

Also checked on the live server: the fleet PSI computed in PromQL equals
monitor.drift.psi of the scraped counters, and every dashboard query is valid PromQL (the
core panels, the drift component and per-feature panels among them, return data).
Skips without prometheus (fails under CI=true).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_files import dicom_bytes
from PIL import Image

from monitor.defaults import default_model_dir
from monitor.drift import psi

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_RULES = REPO / "deploy" / "grafana" / "provisioning" / "alerting" / "cxr-monitor-rules.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "cxr-monitor.json"
NIH_EVERY = 4  # every 4th NIH image (156 of 621)
KERMANY_LIMIT = 300
N_OUT_OF_SCOPE = 40
WINDOW_IMAGES = 100


def _skip_or_fail(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Prom:
    """Minimal client of the Prometheus HTTP API."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def query(self, expr: str) -> list[dict]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        with urllib.request.urlopen(self.base + "/-/ready", timeout=5) as resp:
            return resp.status == 200


def _lower_guards(expr: str, n_images: int) -> str:
    """``expr`` with its image-count guards (``...:increase15m >= 200``) no larger than ``n_images``."""
    return re.sub(
        r"(:increase(?:15m|1h) >= )(\d+)", lambda m: m.group(1) + str(min(int(m.group(2)), n_images)), expr
    )  # fmt: skip


def _test_rules(n_images: int) -> dict:
    """alerts.yml with 1 s ``for:`` and image-count guards no larger than ``n_images``."""
    import yaml

    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            rule["expr"] = _lower_guards(rule["expr"], n_images)
    return rules


# --------------------------------------------------------------------------- Grafana rules

Labels = frozenset[tuple[str, str]]
_MATH_ANY_SAMPLE = re.compile(r"is_number\(\$(\w+)\) \|\| is_nan\(\$\1\) \|\| is_inf\(\$\1\)")


def _grafana_rules(n_images: int) -> list[dict]:
    """The Grafana rules with the same image-count guards as ``_test_rules`` (thresholds unchanged)."""
    import yaml

    rules = [r for g in yaml.safe_load(GRAFANA_RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        for node in rule["data"]:
            if node["datasourceUid"] != "__expr__":
                node["model"]["expr"] = _lower_guards(node["model"]["expr"], n_images)
    return rules


def _series_labels(metric: dict) -> Labels:
    # Grafana's Prometheus data source turns __name__ into the frame name, not a label.
    return frozenset((k, v) for k, v in metric.items() if k != "__name__")


def grafana_condition(api: Prom, rule: dict, at: str) -> set[Labels]:
    """Label sets of the alert instances whose condition holds when Grafana evaluates ``rule`` at ``at``.

    Grafana's semantics, for the node types the rules use (anything else fails the test):

    - a Prometheus query node with ``instant: true`` is an instant query at the evaluation
      time; each series of the vector becomes a number labelled with the series' labels;
    - ``math`` ``is_number($A) || is_nan($A) || is_inf($A)`` is applied per series of A:
      is_number is 1 for a finite value, is_nan for NaN, is_inf for ±Inf, ``||`` is 1 when
      either side is non-zero, so every series of A gives 1 (pkg/expr/mathexp);
    - ``threshold`` ``gt`` p keeps the series whose value is > p as firing (1), the others
      normal (0) (pkg/expr/threshold.go);
    - a condition with no series at all is NoData; the rules set ``noDataState: OK``, so
      it fires nothing. Query nodes outside the condition (``REF*``, read by the templates)
      are run too: an error there fails the evaluation (``execErrState: Error``).
    """
    values: dict[str, dict[Labels, float]] = {}
    nodes = {n["refId"]: n for n in rule["data"]}
    for ref, node in nodes.items():
        model = node["model"]
        if node["datasourceUid"] == "__expr__":
            continue
        assert model["instant"] is True and model["range"] is False, (rule["title"], ref)
        body = api.get("/api/v1/query", query=model["expr"], time=at)
        assert body["status"] == "success" and body["data"]["resultType"] == "vector", (
            rule["title"],
            ref,
            body,
        )
        values[ref] = {_series_labels(r["metric"]): float(r["value"][1]) for r in body["data"]["result"]}
    pending = [ref for ref, n in nodes.items() if n["datasourceUid"] == "__expr__"]
    while pending:  # expressions in dependency order
        ref = next(r for r in pending if all(d in values for d in _depends(nodes[r]["model"])))
        pending.remove(ref)
        model = nodes[ref]["model"]
        if model["type"] == "math":
            m = _MATH_ANY_SAMPLE.fullmatch(model["expression"])
            assert m, f"{rule['title']} {ref}: math expression not modelled here: {model['expression']}"
            values[ref] = {k: float(math.isfinite(v) or math.isnan(v) or math.isinf(v))
                           for k, v in values[m.group(1)].items()}  # fmt: skip
        elif model["type"] == "threshold":
            (cond,) = model["conditions"]
            assert cond["evaluator"]["type"] == "gt", f"{rule['title']} {ref}: {cond}"
            (limit,) = cond["evaluator"]["params"]
            values[ref] = {k: float(v > limit) for k, v in values[model["expression"]].items()}
        else:
            pytest.fail(f"{rule['title']} {ref}: expression type {model['type']!r} not modelled here")
    return {labels for labels, v in values[rule["condition"]].items() if v != 0}


def _depends(model: dict) -> set[str]:
    if model["type"] == "math":
        return set(re.findall(r"\$\{?(\w+)\}?", model["expression"]))
    return {model["expression"]}


def _prometheus_twin(api: Prom, rule: dict) -> tuple[str, set[Labels]]:
    """(evaluation timestamp, label sets of pending or firing alerts) of a Grafana rule's Prometheus twin."""
    name = rule["title"].split(" (")[0]
    groups = api.get("/api/v1/rules", type="alert")["data"]["groups"]
    (twin,) = [
        r for g in groups for r in g["rules"] if r["name"] == name and r.get("labels", {}) == rule["labels"]
    ]
    own = set(rule["labels"]) | {"alertname"}
    active = {frozenset((k, v) for k, v in a["labels"].items() if k not in own) for a in twin["alerts"]
              if a["state"] in ("pending", "firing")}  # fmt: skip
    return twin["lastEvaluation"], active


def _compare_with_twins(api: Prom, rules: list[dict], attempts: int = 5) -> dict[str, set[Labels]]:
    """Grafana condition of every rule at its Prometheus twin's last evaluation time; they must agree.

    The alert and recording rule groups run independently: a recording sample or scrape stamped
    before the evaluation time may land just after the alert rule read the data, so a mismatch
    is re-checked at the next evaluation a few times before it fails the test.
    """
    result = {}
    for rule in rules:
        for _ in range(attempts):
            at, prometheus = _prometheus_twin(api, rule)
            grafana = grafana_condition(api, rule, at)
            if grafana == prometheus:
                break
            time.sleep(1.1)
        assert grafana == prometheus, f"{rule['title']} at {at}: Grafana {grafana} != Prometheus {prometheus}"
        result[rule["title"]] = grafana
    return result


def _replay(grpc_port: int, folder: Path, limit: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "monitor.cli", "client", "replay", "--address", f"127.0.0.1:{grpc_port}",
           str(folder), "--concurrency", "2", "--no-progress", "--json", "--timeout", "60"]  # fmt: skip
    if limit is not None:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return None


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    subst = {"$__rate_interval": "1m", "$rate_window": "15m", "$job": "cxr-monitor", "$instance": ".*",
             "$window": "count|time"}  # fmt: skip
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            yield f"{panel['title']} / {t['refId']}", expr


def _fit_without(tmp_path: Path, images: Path, held_out: set[str]) -> Path:
    """``cxr-monitor fit`` on the NIH images not in ``held_out``, as the bundled model was fitted."""
    default = json.loads((default_model_dir() / "model.json").read_text())
    threshold = default["card"]["fit_data"]["threshold"]
    with (REPO / "models" / "default-outcomes.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    outcomes = tmp_path / "outcomes-fit.csv"
    with outcomes.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["image"] not in held_out)
    out = tmp_path / "model-3q"
    proc = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "fit", "--images", str(images), "--outcomes", str(outcomes),
         "--out", str(out), "--threshold", str(threshold), "--jobs", "2", "--no-cache", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    fitted = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfitted on {len(rows) - len(held_out)} NIH images: {fitted.get('n_clusters')} clusters")
    return out


@pytest.fixture
def stack(tmp_path: Path, data_dir: Path) -> Iterator[dict]:
    """A sidecar and a Prometheus scraping it, torn down whatever happens."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        _skip_or_fail(
            "prometheus not found on PATH: install Debian's prometheus package (scripts/ensure-prometheus.sh)"
        )
    try:
        import yaml
    except ModuleNotFoundError:
        _skip_or_fail("PyYAML is not installed (pip install pyyaml): it writes the test's Prometheus config")

    nih_all = sorted((data_dir / "nih" / "images").glob("*.webp"))
    kermany = data_dir / "kermany" / "test"
    if len(nih_all) < 100 or not kermany.is_dir():
        _skip_or_fail(f"NIH images or Kermany test images missing under {data_dir}")
    nih = tmp_path / "nih-subset"
    nih.mkdir()
    # Replayed in a seeded random order (the replay walks the folder in name order): NIH file
    # names follow patient ids, i.e. acquisition time, and in that order the first ~45 images of
    # this subset are 0.6-0.7 SD brighter than the rest, which the intensity drift component of
    # profile spec 2.0 rightly reports. In-distribution traffic means exchangeable images.
    order = np.random.default_rng(0).permutation(len(nih_all[::NIH_EVERY]))
    for k, path in zip(order, nih_all[::NIH_EVERY], strict=True):
        (nih / f"{k:03d}_{path.name}").symlink_to(path)
    n_nih = len(nih_all[::NIH_EVERY])
    model = _fit_without(tmp_path, data_dir / "nih" / "images", {p.name for p in nih_all[::NIH_EVERY]})

    grpc_port, metrics_port, web_port = _free_port(), _free_port(), _free_port()
    rules = tmp_path / "alerts.yml"
    guard = min(n_nih, KERMANY_LIMIT) // 2
    rules.write_text(yaml.safe_dump(_test_rules(guard), sort_keys=False))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "cxr-monitor",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    sidecar_log = (tmp_path / "sidecar.log").open("w")
    prom_log = (tmp_path / "prometheus.log").open("w")
    sidecar = prom = None
    try:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "serve", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
             "--workers", "2", "--window-images", str(WINDOW_IMAGES), "--window-seconds", "600",
             "--log-format", "text", "--log-level", "INFO"],
            stdout=sidecar_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        prom = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
            stdout=prom_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        api = Prom(web_port)
        _wait("Prometheus to be ready", api.ready, timeout=60)
        _wait("the sidecar to be scraped with its model loaded",
              lambda: api.value('cxr_monitor_model_loaded{job="cxr-monitor"}') == 1, timeout=90)  # fmt: skip
        yield {"api": api, "grpc_port": grpc_port, "nih": nih, "n_nih": n_nih, "kermany": kermany,
               "sidecar": sidecar, "tmp": tmp_path, "grafana_rules": _grafana_rules(guard)}  # fmt: skip
    finally:
        _stop(sidecar)
        _stop(prom)
        sidecar_log.close()
        prom_log.close()


def _drift_alerts(api: Prom, state: str | None = None) -> list[dict]:
    sel = 'alertname=~"CXRMonitorDrift|CXRMonitorNoveltySurge"' + (f', alertstate="{state}"' if state else "")
    return api.query(f"ALERTS{{{sel}}}")


def _window_numbers(api: Prom) -> dict[str, float | None]:
    out = {}
    for gauge in ("psi", "chi2_p_value", "novelty_ratio", "window_images", "detected"):
        for window in ("count", "time"):
            out[f"{gauge}[{window}]"] = api.value(f'cxr_monitor_drift_{gauge}{{window="{window}"}}')
    out["fleet_psi"] = api.value("cxr_monitor:cluster_mix_psi:rate15m")
    out["fleet_novel_share"] = api.value("cxr_monitor:novel_share:rate15m")
    return out


def test_drift_alert_quiet_on_nih_and_firing_on_kermany(stack: dict) -> None:
    api: Prom = stack["api"]

    # ---- 1. in-distribution NIH images: no drift alert, not even pending
    summary = _replay(stack["grpc_port"], stack["nih"])
    n_nih = stack["n_nih"]
    assert summary["scored"] == n_nih and summary["errors"] == 0, summary
    _wait("Prometheus to scrape every NIH image",
          lambda: api.value("sum(cxr_monitor_images_scored_total)") == n_nih, timeout=30)  # fmt: skip
    _wait("the rules to evaluate on every NIH image",
          lambda: (api.value("cxr_monitor:images_scored:increase15m") or 0) >= 0.9 * n_nih, timeout=30)  # fmt: skip
    time.sleep(4)  # several evaluations with 1 s `for:` (an alert would be firing by now)
    nih_numbers = _window_numbers(api)
    ever = api.query('max_over_time(ALERTS{alertname=~"CXRMonitorDrift|CXRMonitorNoveltySurge"}[10m])')
    assert ever == [], f"drift/novelty alert on in-distribution NIH images: {ever}; numbers: {nih_numbers}"
    print(f"\nNIH subset ({n_nih} images): {nih_numbers}")

    # The Grafana twins agree with Prometheus on every rule; drift and novelty are quiet.
    grafana_rules = stack["grafana_rules"]
    on_nih = _compare_with_twins(api, grafana_rules)
    print(f"Grafana conditions on NIH: {sorted(t for t, fired in on_nih.items() if fired)} hold")
    for title, fired in on_nih.items():
        if title.startswith(("CXRMonitorDrift", "CXRMonitorNoveltySurge")):
            assert fired == set(), f"Grafana rule {title} holds on in-distribution NIH images: {fired}"

    # The fleet PSI computed in PromQL from the counters equals monitor.drift.psi of the counts.
    counts = {
        r["metric"]["cluster"]: float(r["value"][1])
        for r in api.query("cxr_monitor_cluster_assignments_total")
    }
    ref = {
        r["metric"]["cluster"]: float(r["value"][1]) for r in api.query("cxr_monitor_reference_cluster_ratio")
    }
    order = sorted(ref)
    expected = psi(np.array([counts[c] for c in order]), np.array([ref[c] for c in order]))
    got = api.value("cxr_monitor:cluster_mix_psi:rate15m")
    assert got is not None and got == pytest.approx(expected, rel=0.02, abs=2e-3), (got, expected, counts)

    # ---- 2. Kermany paediatric images: drift fires from the replica window and fleet-wide
    summary = _replay(stack["grpc_port"], stack["kermany"], limit=KERMANY_LIMIT)
    assert summary["scored"] == KERMANY_LIMIT and summary["errors"] == 0, summary

    def firing_scopes() -> set[str] | None:
        scopes = {a["metric"].get("scope", "") for a in _drift_alerts(api, "firing")
                  if a["metric"]["alertname"] == "CXRMonitorDrift"}  # fmt: skip
        return scopes if {"replica", "fleet"} <= scopes else None

    _wait("CXRMonitorDrift to fire for the replica and the fleet", firing_scopes, timeout=60)
    kermany_numbers = _window_numbers(api)
    print(f"after {KERMANY_LIMIT} Kermany images: {kermany_numbers}")
    assert kermany_numbers["detected[count]"] == 1
    assert kermany_numbers["fleet_psi"] is not None and kermany_numbers["fleet_psi"] > 0.2

    # The Grafana twins fire where Prometheus fires: drift for the replica and the fleet.
    on_kermany = _compare_with_twins(api, grafana_rules)
    print(f"Grafana conditions on Kermany: {sorted(t for t, fired in on_kermany.items() if fired)} hold")
    replica = on_kermany["CXRMonitorDrift (replica)"]
    assert len(replica) == 1 and dict(next(iter(replica)))["job"] == "cxr-monitor", replica
    assert on_kermany["CXRMonitorDrift (fleet)"] == {frozenset()}

    # ---- 3. ultrasound DICOMs: out of the model's scope by their header; the alert and its twin fire
    us = stack["tmp"] / "ultrasound"
    us.mkdir()
    nih_files = sorted((stack["nih"]).iterdir())[:N_OUT_OF_SCOPE]
    for i, path in enumerate(nih_files):
        pixels = np.asarray(Image.open(path).convert("L"))
        (us / f"us{i:02d}.dcm").write_bytes(dicom_bytes(pixels, modality="US", BodyPartExamined="ABDOMEN"))
    summary = _replay(stack["grpc_port"], us)
    assert summary["scored"] == N_OUT_OF_SCOPE and summary["errors"] == 0, summary
    _wait("CXRMonitorOutOfScopeTraffic to fire",
          lambda: api.query('ALERTS{alertname="CXRMonitorOutOfScopeTraffic", alertstate="firing"}'), timeout=60)  # fmt: skip
    share = api.value("cxr_monitor:out_of_scope_share:rate15m")
    print(f"after {N_OUT_OF_SCOPE} ultrasound DICOMs: out-of-scope share {share}")
    assert share is not None and share > 0.05
    assert api.value('cxr_monitor_drift_component_detected{component="out_of_scope", window="count"}') == 1
    (twin,) = [r for r in grafana_rules if r["title"] == "CXRMonitorOutOfScopeTraffic"]
    assert _compare_with_twins(api, [twin]) == {twin["title"]: {frozenset()}}

    # ---- the dashboard's queries are valid PromQL on a live server, and its core panels have data
    empty = []
    for where, expr in _dashboard_queries():
        body = api.get("/api/v1/query", query=expr)
        assert body["status"] == "success", f"{where}: {body}"
        if not body["data"]["result"]:
            empty.append(where)
    for must in ("Fleet PSI / A", "Cluster mix now vs reference / A", "Per-image latency p50 / p95 / p99 / B",
                 "Reliability distribution / A", "Window PSI / A", "Model info / A", "Requests / s by method and code / A",
                 "Drift verdict by component / A", "Drifted features by component / B",
                 "Largest feature rank shift by component, against feature_shift_min / C",
                 "Smallest feature q-value by component, against feature_alpha / C",
                 "Feature rank shift in units of feature_shift_min now (largest 15) / A",
                 *(f"Features beyond feature_shift_min now: shift, rank shift, p-value and q-value against the thresholds / {r}"
                   for r in "ABCDEFG"),
                 "Out-of-scope share by header field / A", "Out-of-scope share by header field / B",
                 "Drift thresholds of the served model / A"):  # fmt: skip
        assert must not in empty, f"dashboard query {must!r} returned no data"

    # ---- graceful stop: SIGTERM → exit 0 within the grace period (as Docker and Kubernetes stop it)
    assert _stop(stack["sidecar"], timeout=20) == 0
