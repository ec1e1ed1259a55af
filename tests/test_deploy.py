"""Static checks of the deployment files: Grafana dashboard and provisioning, Prometheus
configuration, docker-compose, Kubernetes example and the Dockerfile.

The dashboard and rule expressions are checked against the metric names the sidecar
really exposes (built on a fresh registry by monitor.metrics), so renaming a metric
without updating deploy/ fails here. The Dockerfile is parsed, not built (no Docker
engine in the test environment).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.defaults import default_model_dir
from monitor.drift import DriftThresholds
from monitor.metrics import DRIFT_FEATURE_GAUGES, DRIFT_GAUGES, DicomMetrics, MonitorMetrics
from monitor.settings import DEFAULT_METRICS_PORT, DEFAULT_PORT
from monitor.spectrum import INTENSITY_FEATURES

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cxr-monitor.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes" / "cxr-monitor.yaml"
K8S_SCRAPE = DEPLOY / "kubernetes" / "prometheus-scrape-config.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASH_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "cxr-monitor.yaml"
ALERTING_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "alerting"
GRAFANA_RULES = ALERTING_PROVISIONING / "cxr-monitor-rules.yaml"
SCRIPTS = REPO / "scripts"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SERVICE_NAME = "cxrmonitor.v1.ReliabilityMonitor"

#: Series every Prometheus has, which dashboards and rules may use besides ours.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def _yaml_module() -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        msg = "PyYAML is not installed (pip install pyyaml): it parses the deployment files"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return yaml


def _yaml(path: Path) -> Any:
    with path.open() as fh:
        return _yaml_module().safe_load(fh)


def _yaml_all(path: Path) -> list[Any]:
    with path.open() as fh:
        return [d for d in _yaml_module().safe_load_all(fh) if d]


# --------------------------------------------------------------------------- PromQL names

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression selects; functions, labels and keywords dropped.

    A tokenizer, not a parser: enough for the expressions of this repository, where
    names are identifiers not followed by ``(``, outside strings, label matchers,
    ranges and grouping clauses.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', " ", expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[\w$]+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables outside ranges
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_promql_metric_names_finds_names_and_only_names() -> None:
    expr = (
        'sum by (cluster) (rate(cxr_monitor_bogus_total{job=~"$job", code!="OK"}[$__rate_interval])) '
        "/ ignoring (cluster) group_left sum(rate(other_metric[5m] offset 1h)) > bool 1e-4 "
        'and on () cxr_monitor:rule:rate5m + label_replace(vector(1), "x", "y", "", "")'
    )
    assert promql_metric_names(expr) == {"cxr_monitor_bogus_total", "other_metric", "cxr_monitor:rule:rate5m"}


@pytest.fixture(scope="module")
def exposed_names() -> set[str]:
    """Every sample name the sidecar's metrics can expose (from a fresh registry)."""
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry)
    metrics.watch_windows(dict)  # registers the drift window gauges (no windows: no samples)
    metrics.watch_source_windows(dict)  # and the per-source ones
    DicomMetrics(registry)  # the DICOM node's, registered when it is enabled
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "info": ("_info",), "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}  # fmt: skip
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    assert "cxr_monitor_requests_total" in names and "cxr_monitor_drift_psi" in names
    return names


@pytest.fixture(scope="module")
def recording_rules() -> set[str]:
    return {r["record"] for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "record" in r}


# --------------------------------------------------------------------------- dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> Iterator[dict]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def _queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query: panel targets, variable queries, annotations."""
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            yield f"variable {v['name']}", m.group(1) if m else q
    for a in dashboard["annotations"]["list"]:
        # Grafana keeps a Prometheus annotation's query in `target` (legacy: top-level `expr`).
        expr = a.get("target", {}).get("expr", a.get("expr"))
        if expr is not None:
            yield f"annotation {a['name']}", expr


def test_dashboard_identity(dashboard: dict) -> None:
    assert dashboard["uid"] == "cxr-monitor"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    ds = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["name"] == "datasource" and ds[0]["query"] == "prometheus"


def test_dashboard_panels_have_datasource_and_targets(dashboard: dict) -> None:
    # Rows and the alert list (it lists Grafana's alert rules, no data source query) have no targets.
    panels = [p for p in _panels(dashboard) if p["type"] not in ("row", "alertlist")]
    assert len(panels) >= 20
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], where
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), where
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], where
            assert t["expr"].strip(), where
        assert p.get("description"), f"{where}: say what the panel shows"


def test_dashboard_ids_unique_and_layout_sound(dashboard: dict) -> None:
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"panels {a[0]!r} and {b[0]!r} overlap"


def test_dashboard_queries_use_only_existing_metrics(
    dashboard: dict, exposed_names: set[str], recording_rules: set[str]
) -> None:
    known = exposed_names | recording_rules | PROMETHEUS_SERIES
    for where, expr in _queries(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= known, f"{where}: unknown metrics {sorted(names - known)}"


def test_dashboard_covers_the_monitor(dashboard: dict) -> None:
    """The views the dashboard promises: each per-replica drift gauge, the fleet PSI, latency, reliability."""
    exprs = [e for _, e in _queries(dashboard)]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    for gauge in DRIFT_GAUGES:
        assert f"cxr_monitor_{gauge}" in used, gauge
    for name in ("cxr_monitor_requests_total", "cxr_monitor_request_duration_seconds_bucket",
                 "cxr_monitor_stage_duration_seconds_sum", "cxr_monitor_reliability_ratio_bucket",
                 "cxr_monitor_predicted_failures_total", "cxr_monitor_outcomes_total",
                 "cxr_monitor_blind_spot_images_total", "cxr_monitor_novel_images_total",
                 "cxr_monitor_info", "cxr_monitor_model_loaded", "cxr_monitor_inflight_requests"):  # fmt: skip
        assert name in used, name
    assert any(e.startswith("histogram_quantile(0.99") for e in exprs)
    fleet_psi = [e for e in exprs if "ln(" in e and "cxr_monitor_cluster_assignments_total" in e]
    assert fleet_psi and all("cxr_monitor_reference_cluster_ratio" in e for e in fleet_psi)
    kinds = {p["type"] for p in _panels(dashboard)}
    assert {"heatmap", "table", "timeseries", "stat"} <= kinds


def test_dashboard_shows_drift_components_and_features(dashboard: dict) -> None:
    """Each per-feature drift gauge, the component verdicts and the thresholds have a panel (issue 12)."""
    exprs = [e for _, e in _queries(dashboard)]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    for gauge in (*DRIFT_FEATURE_GAUGES, "drift_component_detected", "drift_threshold"):
        assert f"cxr_monitor_{gauge}" in used, gauge
    # Feature statistics are shown against the model's own thresholds (read from the gauge) in one panel.
    panels = [" ".join(t["expr"] for t in p.get("targets", [])) for p in _panels(dashboard)]
    assert any('threshold="feature_alpha"' in e and "feature_q_value" in e for e in panels)
    assert any('threshold="feature_shift_min"' in e and "feature_rank_shift{" in e for e in panels)
    assert any("feature_p_value" in e and "feature_q_value" in e and "feature_detected" in e for e in panels)
    assert "cxr_monitor_out_of_scope_images_total" in used
    assert "cxr_monitor:out_of_scope_share:rate15m" in used


_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def _matchers(expr: str, label: str) -> list[tuple[str, str]]:
    """(operator, value) of every ``label`` matcher inside the selectors of ``expr``."""
    found = []
    for selector in re.findall(r"\{([^}]*)\}", expr):
        found += [(op, value) for name, op, value in _MATCHER.findall(selector) if name == label]
    return found


def test_dashboard_label_values_exist(dashboard: dict) -> None:
    """Threshold names and feature patterns in the queries name what the sidecar exports.

    A misspelt ``threshold="feature_alfa"`` or a feature pattern that matches nothing is valid
    PromQL that returns no data: the panel would stay empty without any error.
    """
    thresholds = {f.name for f in dataclasses.fields(DriftThresholds)}
    model = json.loads((default_model_dir() / "model.json").read_text())
    features = model["spectrum"]["feature_names"]
    assert set(INTENSITY_FEATURES) <= set(features)
    checked = 0
    for where, expr in _queries(dashboard):
        for op, value in _matchers(expr, "threshold"):
            assert op == "=" and value in thresholds, f"{where}: no drift threshold {value!r}"
            checked += 1
        for op, value in _matchers(expr, "feature"):
            pattern = re.compile(value)  # Prometheus regexes are anchored
            matched = {f for f in features if pattern.fullmatch(f)}
            if op in ("=~", "="):
                assert matched, f"{where}: feature {op} {value!r} matches no feature of the model"
            else:
                assert matched, f"{where}: feature {op} {value!r} excludes nothing"
            # The dashboard splits features into components by name: intensity_* is exactly the intensity ones.
            selected = matched if op in ("=~", "=") else set(features) - matched
            spectral = set(features) - set(INTENSITY_FEATURES)
            assert selected in (set(INTENSITY_FEATURES), spectral), (
                f"{where}: {op} {value!r} splits a component"
            )
            checked += 1
    assert checked >= 10


def test_dashboard_shows_drift_and_dicom_traffic_per_source(dashboard: dict, exposed_names: set[str]) -> None:
    """Every per-source drift gauge and every DICOM node metric has a panel, filtered by $source."""
    exprs = [e for _, e in _queries(dashboard)]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    dicom = {n for n in exposed_names if n.startswith("cxr_monitor_dicom_") and not n.endswith("_created")}
    dicom -= {n for n in dicom if n.endswith(("_count", "_sum"))}
    assert dicom - used == set()
    for gauge in (
        "drift_psi",
        "drift_novelty_ratio",
        "drift_estimated_failure_ratio",
        "drift_detected",
        "drift_component_detected",
    ):
        assert f"cxr_monitor_source_{gauge}" in used, gauge
    assert any('source=~"$source"' in e for e in exprs)
    assert "source" in {v["name"] for v in dashboard["templating"]["list"]}


def test_rules_use_only_existing_metrics(exposed_names: set[str], recording_rules: set[str]) -> None:
    known = exposed_names | recording_rules | PROMETHEUS_SERIES
    for group in _yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            names = promql_metric_names(rule["expr"])
            name = rule.get("alert") or rule.get("record")
            assert names, name
            assert names <= known, f"{name}: unknown metrics {sorted(names - known)}"


# --------------------------------------------------------------------------- Grafana provisioning


def test_grafana_provisioning() -> None:
    ds = _yaml(DS_PROVISIONING)
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert re.fullmatch(r"https?://[\w.-]+:\d+", source["url"])
    dash = _yaml(DASH_PROVISIONING)
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --------------------------------------------------------------------------- Grafana alerting


def _script(name: str) -> Any:
    """Import scripts/<name>.py (the scripts are not a package)."""
    import importlib.util
    import sys

    _yaml_module()  # both scripts read YAML: skip (or fail under CI) without PyYAML
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _jsonschema() -> None:
    try:
        import jsonschema  # noqa: F401
    except ModuleNotFoundError:
        msg = (
            "jsonschema is not installed (pip install jsonschema): it checks the alerting provisioning files"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def grafana_rules() -> list[dict]:
    return [r for g in _yaml(GRAFANA_RULES)["groups"] for r in g["rules"]]


def _prometheus_alerts() -> list[dict]:
    return [r for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def _nodes(rule: dict) -> dict[str, dict]:
    return {q["refId"]: q for q in rule["data"]}


def test_grafana_rules_file_is_generated_from_alerts_yml() -> None:
    """One source of truth: the committed Grafana rules are what scripts/grafana_alerts.py writes."""
    generator = _script("grafana_alerts")
    assert GRAFANA_RULES.read_text() == generator.render(), (
        "deploy/grafana/provisioning/alerting/cxr-monitor-rules.yaml is out of date: "
        "run python scripts/grafana_alerts.py"
    )
    assert generator.main(["--check"]) == 0


def test_every_prometheus_alert_has_an_equivalent_grafana_twin(grafana_rules: list[dict]) -> None:
    """Same expression, `for`, labels and summary for each alert, read from the two files themselves."""
    prom = _prometheus_alerts()
    assert len(grafana_rules) == len(prom)
    unmatched = list(grafana_rules)
    for rule in prom:
        expr = rule["expr"].strip()
        twins = [g for g in unmatched if _nodes(g)["A"]["model"]["expr"] == expr]
        assert len(twins) == 1, (
            f"{rule['alert']} {rule['labels']}: {len(twins)} Grafana rules with its expression"
        )
        (twin,) = twins
        unmatched.remove(twin)
        assert twin["title"].split(" (")[0] == rule["alert"]
        assert twin["for"] == rule["for"] and twin["labels"] == rule["labels"], twin["title"]
        assert set(rule["annotations"]) <= set(twin["annotations"]), twin["title"]
        # The condition fires for every series the PromQL query returns, like Prometheus:
        # C = B > 0 with B = is_number($A) || is_nan($A) || is_inf($A) (1 for any sample).
        nodes = _nodes(twin)
        a, b, c = nodes["A"], nodes["B"]["model"], nodes["C"]["model"]
        assert twin["condition"] == "C"
        assert a["model"]["instant"] is True and a["model"]["range"] is False
        assert b["type"] == "math" and b["expression"] == "is_number($A) || is_nan($A) || is_inf($A)"
        assert c["type"] == "threshold" and c["expression"] == "B"
        assert c["conditions"] == [{"type": "query", "evaluator": {"type": "gt", "params": [0]}}]
        assert twin["noDataState"] == "OK" and twin["execErrState"] == "Error"
        assert twin["isPaused"] is False
    assert unmatched == []


def test_grafana_rule_templates_are_grafana_templates(grafana_rules: list[dict]) -> None:
    """No Prometheus-only template left: $value and the query function do not exist in Grafana."""
    for rule in grafana_rules:
        refs = set(_nodes(rule))
        for key, text in rule["annotations"].items():
            assert not re.search(r"\$value\b", text), f"{rule['title']} {key}: Prometheus $value"
            assert "with query" not in text, (
                f"{rule['title']} {key}: Grafana templates have no query function"
            )
            for ref in re.findall(r"\$values\.(\w+)\.", text):
                assert ref in refs, f"{rule['title']} {key}: $values.{ref} is not a query of the rule"
        assert "Check first:" in rule["annotations"]["description"], rule["title"]


def test_grafana_rule_queries_use_only_existing_metrics(
    grafana_rules: list[dict], exposed_names: set[str], recording_rules: set[str]
) -> None:
    known = exposed_names | recording_rules | PROMETHEUS_SERIES
    for rule in grafana_rules:
        for ref, node in _nodes(rule).items():
            if node["datasourceUid"] == "__expr__":
                continue
            names = promql_metric_names(node["model"]["expr"])
            assert names and names <= known, f"{rule['title']} {ref}: unknown metrics {sorted(names - known)}"


def test_grafana_rules_point_at_their_panels_and_panels_link_back(
    grafana_rules: list[dict], dashboard: dict
) -> None:
    panels = {p["id"]: p for p in _panels(dashboard)}
    rule_links = {}
    for p in panels.values():
        for link in p.get("links", []):
            m = re.fullmatch(r"/alerting/grafana/([\w-]+)/view", link["url"])
            if m:
                rule_links.setdefault(m.group(1), []).append(p["id"])
    uids = {r["uid"] for r in grafana_rules}
    assert set(rule_links) <= uids, (
        f"dashboard links to rules that do not exist: {sorted(set(rule_links) - uids)}"
    )
    for rule in grafana_rules:
        panel_id = rule["panelId"]
        assert rule["dashboardUid"] == dashboard["uid"], rule["title"]
        assert rule["annotations"]["__dashboardUid__"] == dashboard["uid"], rule["title"]
        assert rule["annotations"]["__panelId__"] == str(panel_id), rule["title"]
        assert panel_id in panels and panels[panel_id]["type"] not in ("row", "alertlist"), rule["title"]
        assert rule_links.get(rule["uid"]) == [panel_id], (
            f"panel {panel_id} has no link to rule {rule['uid']}"
        )


def test_dashboard_lists_its_alert_rules(dashboard: dict) -> None:
    (panel,) = [p for p in _panels(dashboard) if p["type"] == "alertlist"]
    options = panel["options"]
    assert options["dashboardAlerts"] is True  # the rules linked to this dashboard's panels
    assert options["stateFilter"]["firing"] and options["stateFilter"]["pending"]


def test_grafana_alerting_files_match_grafanas_schema() -> None:
    _jsonschema()
    checker = _script("check_grafana_alerting")
    files = sorted(ALERTING_PROVISIONING.glob("*.yaml"))
    assert {f.name for f in files} == {"cxr-monitor-rules.yaml", "notifications.yaml"}
    for f in files:
        assert checker.check_file(f) == [], f
    assert checker.main([]) == 0


def test_pinned_schema_agrees_with_grafanas_published_definitions() -> None:
    """The transcribed schema allows the keys and enum values of Grafana's own export definitions."""
    schema_dir = DEPLOY / "grafana" / "alerting-schema"
    mine = json.loads((schema_dir / "alerting-file-v1.schema.json").read_text())
    published = json.loads((schema_dir / "grafana-api-export-definitions.json").read_text())["definitions"]
    assert "01c8a967d244b9a5903e8dc66c0debab3006f745" in (schema_dir / "SOURCES.md").read_text()
    reader_only = {"(top)": {"deleteRules", "deleteContactPoints", "resetPolicies", "deleteMuteTimes", "templates",
                             "deleteTemplates"}, "AlertRuleV1": {"dasboardUid"}}  # fmt: skip
    pairs = {"(top)": "AlertingFileExport", "AlertRuleGroupV1": "AlertRuleGroupExport",
             "AlertRuleV1": "AlertRuleExport", "QueryV1": "AlertQueryExport",
             "NotificationSettingsV1": "AlertRuleNotificationSettingsExport", "RecordV1": "AlertRuleRecordExport",
             "ContactPointV1": "ContactPointExport", "ReceiverV1": "ReceiverExport",
             "Route": "NotificationPolicyExport"}  # fmt: skip
    for ours, theirs in pairs.items():
        keys = set((mine if ours == "(top)" else mine["$defs"][ours])["properties"])
        assert keys - reader_only.get(ours, set()) == set(published[theirs]["properties"]), (ours, theirs)
    for field in ("noDataState", "execErrState"):
        assert (
            mine["$defs"]["AlertRuleV1"]["properties"][field]["enum"]
            == published["AlertRuleExport"]["properties"][field]["enum"]
        )


def test_grafana_alerting_checker_uses_grafanas_published_definitions(tmp_path: Path) -> None:
    _jsonschema()
    checker = _script("check_grafana_alerting")
    doc = _yaml(GRAFANA_RULES)
    doc["groups"][0]["rules"][0]["noDataState"] = "Ok"
    errors = checker.check_document(doc)
    assert any(e.endswith("(Grafana's published definitions)") and "noDataState" in e for e in errors), errors


def test_grafana_alerting_checker_rejects_broken_copies(capsys: pytest.CaptureFixture) -> None:
    """Every deliberately broken copy of each file fails the check (and the unmodified files pass)."""
    _jsonschema()
    checker = _script("check_grafana_alerting")
    files = sorted(ALERTING_PROVISIONING.glob("*.yaml"))
    assert checker.self_test(files) == []
    out = capsys.readouterr().out
    n = len(checker.RULE_MUTATIONS) + len(checker.NOTIFICATION_MUTATIONS)
    assert n >= 35 and out.count("rejected: ") == n and "ACCEPTED" not in out


def test_grafana_alerting_checker_reports_file_and_path(tmp_path: Path) -> None:
    _jsonschema()
    checker = _script("check_grafana_alerting")
    yaml = _yaml_module()
    doc = _yaml(GRAFANA_RULES)
    doc["groups"][0]["rules"][2]["for"] = "15 min"
    broken = tmp_path / "rules.yaml"
    broken.write_text(yaml.safe_dump(doc))
    (error,) = checker.check_file(broken)
    assert error.startswith(f"{broken}: groups/0/rules/2/for: '15 min' does not match")
    assert checker.main([str(broken)]) == 1


def test_grafana_generator_refuses_an_alert_without_twin(tmp_path: Path) -> None:
    generator = _script("grafana_alerts")
    yaml = _yaml_module()
    rules = _yaml(ALERTS)
    new = {
        "alert": "CXRMonitorSomethingNew",
        "expr": "vector(1)",
        "for": "1m",
        "labels": {"severity": "warning"},
    }
    rules["groups"][-1]["rules"].append(new)
    alerts = tmp_path / "alerts.yml"
    alerts.write_text(yaml.safe_dump(rules, sort_keys=False))
    with pytest.raises(ValueError, match="CXRMonitorSomethingNew.*0 entries of GRAFANA"):
        generator.build(alerts)
    assert generator.main(["--alerts", str(alerts), "--out", str(tmp_path / "out.yaml")]) == 2


def test_grafana_generator_translates_prometheus_templates() -> None:
    generator = _script("grafana_alerts")
    refs: dict[str, str] = {}
    text = (
        'drop {{ $value | printf "%.2f" }} over {{ with query "cxr_monitor:reference_failure_ratio:avg" }}'
        '{{ . | first | value | printf "%.2f" }}{{ end }} on {{ $labels.instance }}'
    )
    assert generator.translate_template(text, refs) == (
        'drop {{ $values.A.Value | printf "%.2f" }} over {{ $values.REF1.Value | printf "%.2f" }} '
        "on {{ $labels.instance }}"
    )
    assert refs == {"REF1": "cxr_monitor:reference_failure_ratio:avg"}


# --------------------------------------------------------------------------- Prometheus config


def test_prometheus_config() -> None:
    cfg = _yaml(PROM_CONFIG)
    for rule_file in cfg["rule_files"]:
        assert (PROM_CONFIG.parent / rule_file).is_file(), rule_file
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["cxr-monitor"]  # the alerts select job="cxr-monitor"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(f":{DEFAULT_METRICS_PORT}") for t in targets)
    assert 'job="cxr-monitor"' in ALERTS.read_text()


# --------------------------------------------------------------------------- docker-compose


def _volumes(service: dict) -> dict[str, str]:
    """Container path → host path of a service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith((".", "/")):
            out[container] = host
    return out


def test_compose_services_ports_and_mounts() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert {"cxr-monitor", "prometheus", "grafana"} <= set(services)

    sidecar = services["cxr-monitor"]
    build = sidecar["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    container_ports = {int(p.rsplit(":", 1)[1]) for p in sidecar["ports"]}
    assert {DEFAULT_PORT, DEFAULT_METRICS_PORT} <= container_ports
    command = sidecar["command"]
    assert command[0] == "serve"
    assert command[command.index("--port") + 1] == str(DEFAULT_PORT)
    assert command[command.index("--metrics-port") + 1] == str(DEFAULT_METRICS_PORT)

    # Prometheus scrapes the compose service by name, on the port the sidecar serves metrics on.
    prom_cfg = _yaml(PROM_CONFIG)
    job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == "cxr-monitor")
    assert f"cxr-monitor:{DEFAULT_METRICS_PORT}" in job["static_configs"][0]["targets"]

    prom = services["prometheus"]
    mounts = _volumes(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    assert (COMPOSE.parent / mounts[config_path]).resolve() == PROM_CONFIG
    for rule_file in prom_cfg["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert (COMPOSE.parent / mounts[in_container]).resolve() == (PROM_CONFIG.parent / rule_file).resolve()
    assert any(p.endswith(":9090") for p in prom["ports"])

    grafana = services["grafana"]
    mounts = _volumes(grafana)
    for host in mounts.values():
        assert (COMPOSE.parent / host).exists(), host
    assert (
        COMPOSE.parent / mounts["/etc/grafana/provisioning/datasources"]
    ).resolve() == DS_PROVISIONING.parent
    assert (
        COMPOSE.parent / mounts["/etc/grafana/provisioning/dashboards"]
    ).resolve() == DASH_PROVISIONING.parent
    assert (COMPOSE.parent / mounts["/etc/grafana/provisioning/alerting"]).resolve() == ALERTING_PROVISIONING
    provider_path = _yaml(DASH_PROVISIONING)["providers"][0]["options"]["path"]
    assert (COMPOSE.parent / mounts[provider_path]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{DASHBOARD.name}"
    assert any(p.endswith(":3000") for p in grafana["ports"])
    # The provisioned datasource points at the compose Prometheus.
    url = _yaml(DS_PROVISIONING)["datasources"][0]["url"]
    assert url == "http://prometheus:9090"


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return _yaml_all(K8S)


def _sidecar(deployment: dict) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    (sidecar,) = [c for c in containers if c["image"].startswith("cxr-spectral-monitor")]
    return sidecar


def test_k8s_sidecar_has_grpc_probes(k8s_docs: list[dict]) -> None:
    (deployment,) = [d for d in k8s_docs if d["kind"] == "Deployment"]
    sidecar = _sidecar(deployment)
    grpc_port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "grpc")
    assert grpc_port == DEFAULT_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == grpc_port, probe
    assert sidecar["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    if sidecar in deployment["spec"]["template"]["spec"].get("initContainers", []):
        assert sidecar["restartPolicy"] == "Always"  # a native sidecar, not a one-shot init container


def test_k8s_scrape_annotations_match_metrics_port(k8s_docs: list[dict]) -> None:
    (deployment,) = [d for d in k8s_docs if d["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    ann = template["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(DEFAULT_METRICS_PORT)
    assert ann["prometheus.io/path"] == "/metrics"
    sidecar = _sidecar(deployment)
    assert {"name": "metrics", "containerPort": DEFAULT_METRICS_PORT} in [
        {k: p[k] for k in ("name", "containerPort")} for p in sidecar["ports"]
    ]
    scrape = _yaml(K8S_SCRAPE)
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "cxr-monitor"
    keep_labels = [r["source_labels"][0] for r in job["relabel_configs"] if r.get("action") == "keep"]
    # Prometheus exposes pod label "a/b-c" as __meta_kubernetes_pod_label_a_b_c.
    pod_labels = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)
        for k in template["metadata"]["labels"]
    }
    assert any(k in pod_labels for k in keep_labels)


def test_k8s_security_resources_and_shutdown(k8s_docs: list[dict]) -> None:
    (deployment,) = [d for d in k8s_docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    sidecar = _sidecar(deployment)
    sc = sidecar["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp (matplotlib cache, temporary files).
    assert any(m["mountPath"] == "/tmp" for m in sidecar["volumeMounts"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(sidecar["resources"][kind]), kind
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    grace = float(env.get("CXR_MONITOR_GRACE_SECONDS", 8))
    assert spec["terminationGracePeriodSeconds"] > grace


def test_k8s_memory_limit_holds_the_memory_budget(k8s_docs: list[dict]) -> None:
    """The manifest's budget is the default, and its limit leaves the documented room for the
    server's own memory (about 350 MiB idle with 2 decoder processes) and gRPC's buffers."""
    from monitor.defaults import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MEMORY_BUDGET_BYTES

    (deployment,) = [d for d in k8s_docs if d["kind"] == "Deployment"]
    sidecar = _sidecar(deployment)
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    budget = int(env["CXR_MONITOR_MEMORY_BUDGET_BYTES"])
    assert budget == DEFAULT_MEMORY_BUDGET_BYTES
    limit = sidecar["resources"]["limits"]["memory"]
    units = {"Mi": 2**20, "Gi": 2**30}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    assert limit_bytes >= 350 * 2**20 + budget + 2 * DEFAULT_MAX_MESSAGE_BYTES


def test_k8s_service_targets_sidecar_ports(k8s_docs: list[dict]) -> None:
    (deployment,) = [d for d in k8s_docs if d["kind"] == "Deployment"]
    (service,) = [d for d in k8s_docs if d["kind"] == "Service"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    names = {p["name"] for p in _sidecar(deployment)["ports"]}
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert ports[DEFAULT_PORT]["targetPort"] in names and ports[DEFAULT_PORT]["appProtocol"] == "grpc"
    assert ports[DEFAULT_METRICS_PORT]["targetPort"] in names
    assert ports[11112]["targetPort"] == "dicom" and "dicom" in names  # the DICOM routing destination
    env = {e["name"]: e.get("value") for e in _sidecar(deployment).get("env", [])}
    assert env["CXR_MONITOR_DICOM_PORT"] == "11112"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in _dockerfile():
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, args))
    return stages


def _global_args() -> dict[str, str]:
    args = {}
    for instr, a in _dockerfile():
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in a:
            k, v = a.split("=", 1)
            args[k] = v
    return args


def test_dockerfile_base_is_python_slim() -> None:
    images = [a.split()[0] for s in _stages() for i, a in s if i == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: _global_args()[m.group(1)], i) for i in images]
    assert resolved and all(i == "python:3.11-slim" for i in resolved), resolved


def test_dockerfile_runs_as_non_root() -> None:
    final = _stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # USER comes before the entry point so that nothing after it runs as root.
    order = [i for i, _ in final]
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_dockerfile_exec_form_entrypoint_cmd_and_healthcheck() -> None:
    final = dict(_stages()[-1])
    assert json.loads(final["ENTRYPOINT"]) == ["cxr-monitor"]
    assert json.loads(final["CMD"]) == ["serve"]
    hc = final["HEALTHCHECK"]
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert cmd == ["cxr-monitor", "health"]  # follows CXR_MONITOR_PORT (tests/test_client.py)
    # 11112: the DICOM storage node, when enabled (--dicom-port 11112, as in deploy/).
    assert set(final["EXPOSE"].split()) == {str(DEFAULT_PORT), str(DEFAULT_METRICS_PORT), "11112"}


def test_dockerfile_installs_the_lock_and_the_package() -> None:
    runs = [a for s in _stages() for i, a in s if i == "RUN"]
    copies = [a for s in _stages() for i, a in s if i == "COPY"]
    assert any(a.split()[0] == "requirements.lock" for a in copies)
    assert any(re.search(r"pip install --no-deps \.(\s|$)", r) for r in runs)
    assert any("pip check" in r for r in runs)
    # The lock minus the test tools: `grep -v -E '^(names)==' requirements.lock > runtime.lock`.
    (lock_run,) = [r for r in runs if "requirements.lock" in r]
    m = re.search(r"grep -v -i -E '\^\(([^)]+)\)==' requirements\.lock > (\S+)", lock_run)
    assert m, lock_run
    assert re.search(rf"pip install --no-deps -r {re.escape(m.group(2))}", lock_run)
    dropped = {n.lower() for n in m.group(1).split("|")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def name(req: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", req).group().lower()

    assert {name(r) for r in project["optional-dependencies"]["test"]} <= dropped
    assert not {name(r) for r in project["dependencies"]} & dropped, "a runtime dependency is dropped"
    locked = {name(line) for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line}
    assert dropped <= locked, f"not in the lock: {sorted(dropped - locked)}"


def test_dockerfile_bakes_the_default_model() -> None:
    final = _stages()[-1]
    env = " ".join(a for i, a in final if i == "ENV")
    model = re.search(r"CXR_MONITOR_MODEL=(\S+)", env)
    assert model, "CXR_MONITOR_MODEL is not set in the final stage"
    copies = [a.split() for i, a in final if i == "COPY" and not a.startswith("--from")]
    assert any(c[0].rstrip("/") == "models/default" and c[1].rstrip("/") == model.group(1) for c in copies)
    assert (REPO / "models" / "default" / "manifest.json").is_file()


def test_dockerignore_lets_every_copied_source_through() -> None:
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"  # an allow-list: nothing reaches the build unless listed
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in _stages():
        for instr, args in stage:
            if instr != "COPY" or args.startswith("--from"):
                continue
            *sources, _ = args.split()
            for src in sources:
                src = src.rstrip("/")
                assert src in allowed, f"COPY {src}: excluded by .dockerignore"
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    for excluded in (".venv", ".git", "tests"):
        assert excluded not in allowed
