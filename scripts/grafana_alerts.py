"""Write the Grafana-managed twins of the Prometheus alerts (Grafana alerting file provisioning).

    python scripts/grafana_alerts.py            # rewrite deploy/grafana/provisioning/alerting/cxr-monitor-rules.yaml
    python scripts/grafana_alerts.py --check    # exit 1 if the committed file differs from what this writes
    python scripts/grafana_alerts.py --datasource-uid mine --out /tmp/rules.yaml   # for another Prometheus

One source of truth: ``deploy/prometheus/alerts.yml`` defines every alert (expression,
``for``, labels, summary and description; promtool tests it). This script copies each
alerting rule into a Grafana-managed rule without changing its expression, duration or
labels, and adds only what Grafana needs besides: a uid and title, the dashboard panel that
shows the alert, and a "check first" line for the on-call person (``GRAFANA`` below). A rule
added to alerts.yml without a ``GRAFANA`` entry is an error, and ``tests/test_deploy.py``
checks that the committed file equals this script's output.

Each Grafana rule is built as Grafana itself converts a Prometheus rule
(``pkg/services/ngalert/prom/query.go`` of grafana/grafana): an instant PromQL query ``A``
with the Prometheus expression, a math expression ``B = is_number($A) || is_nan($A) ||
is_inf($A)`` (1 for every series the query returns) and the condition ``C = B > 0``. So the
Grafana rule fires for exactly the series the Prometheus rule fires for, with the same labels,
after the same ``for``; no data means no alert (``noDataState: OK``), as in Prometheus. The
query uses the recording rules of alerts.yml, so the Prometheus that Grafana queries must load
that file (its recording rules at least).

Templates are translated as Grafana's converter does: Prometheus' ``$value`` becomes
``$values.A.Value``; a ``{{ with query "expr" }}{{ . | first | value ... }}{{ end }}`` (Grafana
templates have no ``query`` function) becomes an extra instant query ``REF<n>`` of that
expression, read as ``$values.REF<n>.Value``; it is not part of the condition.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
OUT = REPO / "deploy" / "grafana" / "provisioning" / "alerting" / "cxr-monitor-rules.yaml"
DASHBOARD_UID = "cxr-monitor"
DATASOURCE_UID = "prometheus"  # deploy/grafana/provisioning/datasources/prometheus.yaml
FOLDER = "CXR monitor"  # the dashboards' folder (deploy/grafana/provisioning/dashboards)
GROUP = "cxr-monitor"
# Prometheus evaluates every 15 s (deploy/prometheus/prometheus.yml); Grafana's group interval
# must be a multiple of its 10 s base interval, so the nearest is 20 s.
INTERVAL = "20s"
# The query's time range (Grafana's default for converted Prometheus rules): an instant query
# is evaluated at the end of it.
QUERY_RANGE_SECONDS = 600

__all__ = ["GRAFANA", "GrafanaTwin", "build", "main", "prometheus_alert_rules", "render", "twin_of"]


@dataclass(frozen=True)
class GrafanaTwin:
    """What a Grafana rule adds to its Prometheus twin.

    match : labels that pick the Prometheus rule among those with the same ``alert`` name.
    uid : the Grafana rule uid (≤ 40 characters of ``[a-zA-Z0-9_-]``; panel links use it).
    suffix : appended to the alert name to make the Grafana title unique in the folder.
    panel_id : the panel of deploy/grafana/dashboards/cxr-monitor.json that shows the alert.
    check_first : what the on-call person looks at first (appended to the description).
    """

    alert: str
    match: tuple[tuple[str, str], ...]
    uid: str
    suffix: str
    panel_id: int
    check_first: str

    @property
    def title(self) -> str:
        return f"{self.alert} ({self.suffix})" if self.suffix else self.alert


GRAFANA: tuple[GrafanaTwin, ...] = (
    GrafanaTwin(
        alert="CXRMonitorDrift",
        match=(("scope", "replica"),),
        uid="cxr-monitor-drift-replica",
        suffix="replica",
        panel_id=30,
        check_first=(
            "'Drift verdict by component' of {{ $labels.instance }} for the part that fires (cluster_mix: "
            "window PSI and chi-square p; novelty; intensity and spectral features: 'Features beyond "
            "feature_shift_min now'; out_of_scope: 'Out-of-scope share by header field'); `cxr-monitor drift` "
            "on a sample of that replica's recent images lists the most shifted features; then which source "
            "feeds that replica (site, scanner, export settings, or the sending DICOM AE)."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorDrift",
        match=(("scope", "fleet"),),
        uid="cxr-monitor-drift-fleet",
        suffix="fleet",
        panel_id=26,
        check_first=(
            "'Cluster mix now vs reference' and 'Cluster mix: now / reference' for the clusters that grew; "
            "the model report (`cxr-monitor report`) describes those clusters' spectra and metadata; "
            "'Replicas in drift' and 'Images scored / s by replica' show whether one replica (one source) "
            "or all of them moved."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorNoveltySurge",
        match=(),
        uid="cxr-monitor-novelty-surge",
        suffix="",
        panel_id=27,
        check_first=(
            "'Window novelty ratio' per replica to find the source; score responses of the novel images "
            "carry is_novel and their most deviating features (`cxr-monitor client score`); look for "
            "non-radiographs, lateral views, inverted polarity or a new modality from one sender."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorOutOfScopeTraffic",
        match=(),
        uid="cxr-monitor-out-of-scope-traffic",
        suffix="",
        panel_id=56,
        check_first=(
            "'Out-of-scope share by header field' for the field (modality, body_part, view_position); "
            "'Drift verdict by component' (out_of_scope) for the replica, and the DICOM node's per-source "
            "panels for the sending AE title; score responses carry scope_reasons. Usually a routing rule "
            "that forwards every study instead of chest CR/DX; if such images are expected, widen the "
            "model's scope allow-lists (--scope-modalities, ...) instead."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorReliabilityDrop",
        match=(),
        uid="cxr-monitor-reliability-drop",
        suffix="",
        panel_id=21,
        check_first=(
            "'Cluster mix now vs reference' for the clusters that grew, and their failure rates in the model "
            "report (`cxr-monitor report` / `cxr-monitor info`); compare with the realized failure rate where "
            "outcomes are reported; 'Images scored / s by replica' for the source that sends them."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorBlindSpotTraffic",
        match=(),
        uid="cxr-monitor-blind-spot-traffic",
        suffix="",
        panel_id=27,
        check_first=(
            "which blind-spot clusters grew ('Cluster mix now vs reference'; the model report lists the "
            "blind spots and their spectra), and which replica and source send those images; review their "
            "predictions manually until the classifier is retrained."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorRealizedFailureRate",
        match=(),
        uid="cxr-monitor-realized-failure-rate",
        suffix="",
        panel_id=21,
        check_first=(
            "'Realized failure rate by cluster' for the cluster that carries the excess, against its rate "
            "in the model report (`cxr-monitor report`); which replica and source report the outcomes; "
            "whether the classifier or the labelling changed without a refit."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorHighErrorRate",
        match=(("severity", "critical"),),
        uid="cxr-monitor-server-errors",
        suffix="server errors",
        panel_id=11,
        check_first=(
            "'Error ratio by code' for the code, then the sidecar log: INTERNAL errors carry an error_ref to "
            "its log line; RESOURCE_EXHAUSTED means overload or images above the size limits; "
            "'Requests / s by method and code' for the replica."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorHighErrorRate",
        match=(("severity", "warning"),),
        uid="cxr-monitor-request-errors",
        suffix="all errors",
        panel_id=11,
        check_first=(
            "'Error ratio by code': INVALID_ARGUMENT and FAILED_PRECONDITION are the callers' images (the "
            "sidecar logs each with its reason); find the sender whose format changed."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorHighLatency",
        match=(),
        uid="cxr-monitor-high-latency",
        suffix="",
        panel_id=12,
        check_first=(
            "'Time per stage' (decode, profile or score bound) and 'In-flight requests' per replica; for "
            "decode-bound JPEG 2000 DICOMs check decode_process_count in the sidecar's starting log line."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorNoTraffic",
        match=(),
        uid="cxr-monitor-no-traffic",
        suffix="",
        panel_id=10,
        check_first=(
            "the caller: is the classifier running and does it call the sidecar's address and port "
            "(50051)? 'Requests / s by method and code' shows when traffic stopped; mute the alert for "
            "hours without traffic by design."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorDown",
        match=(("cause", "unreachable"),),
        uid="cxr-monitor-down-unreachable",
        suffix="unreachable",
        panel_id=2,
        check_first=(
            "the container or pod of {{ $labels.instance }} (crash loop, OOM kill, port); its last log lines."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorDown",
        match=(("cause", "no_model"),),
        uid="cxr-monitor-down-no-model",
        suffix="no model",
        panel_id=3,
        check_first=(
            "the sidecar log of {{ $labels.instance }}: it says why the model did not load (invalid model "
            "directory exits with status 3) or that it is shutting down."
        ),
    ),
    GrafanaTwin(
        alert="CXRMonitorDown",
        match=(("cause", "no_target"),),
        uid="cxr-monitor-down-no-target",
        suffix="no target",
        panel_id=2,
        check_first=(
            "Prometheus' targets page: the scrape job must be named cxr-monitor and, on Kubernetes, the pods "
            "need the scrape annotations and the cxr-monitor/sidecar label."
        ),
    ),
)

_WITH_QUERY = re.compile(
    r'\{\{\s*with query "(?P<expr>(?:[^"\\]|\\.)*)"\s*\}\}\{\{\s*\.\s*\|\s*first\s*\|\s*value\s*'
    r"(?P<pipe>(?:\|[^}]*)?)\}\}\{\{\s*end\s*\}\}"
)
_VALUE = re.compile(r"\$value\b")


def prometheus_alert_rules(path: Path = ALERTS) -> list[dict]:
    """Every alerting rule of a Prometheus rule file, in file order (recording rules left out)."""
    rules = yaml.safe_load(path.read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def twin_of(rule: dict) -> GrafanaTwin:
    """The ``GRAFANA`` entry of a Prometheus alerting rule; exactly one must match."""
    found = [
        t for t in GRAFANA
        if t.alert == rule["alert"] and all(rule.get("labels", {}).get(k) == v for k, v in t.match)
    ]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"{rule['alert']} {rule.get('labels', {})}: {len(found)} entries of GRAFANA in "
            f"{Path(__file__).name} match it, expected exactly 1 (add one, or make `match` pick it)"
        )
    return found[0]


def translate_template(text: str, refs: dict[str, str]) -> str:
    """Prometheus alert template → Grafana alert template (see the module docstring).

    ``refs`` collects the extra queries a ``with query`` needs: refId → PromQL.
    """

    def with_query(m: re.Match) -> str:
        expr = m.group("expr").replace('\\"', '"')
        ref = next((r for r, e in refs.items() if e == expr), None) or f"REF{len(refs) + 1}"
        refs[ref] = expr
        return f"{{{{ $values.{ref}.Value {m.group('pipe').strip()} }}}}".replace("  ", " ")

    out = _WITH_QUERY.sub(with_query, text)
    if "query " in out:
        raise ValueError(f"unsupported use of the query function in template: {text!r}")
    return _VALUE.sub("$values.A.Value", out)


def _prometheus_query(ref: str, expr: str, datasource_uid: str) -> dict:
    return {
        "refId": ref,
        "relativeTimeRange": {"from": QUERY_RANGE_SECONDS, "to": 0},
        "datasourceUid": datasource_uid,
        "model": {
            "refId": ref,
            "datasource": {"type": "prometheus", "uid": datasource_uid},
            "expr": expr,
            "instant": True,
            "range": False,
        },
    }


def _expression(ref: str, model: dict) -> dict:
    return {
        "refId": ref,
        "datasourceUid": "__expr__",
        "model": {"refId": ref, "datasource": {"type": "__expr__", "uid": "__expr__"}, **model},
    }


def grafana_rule(rule: dict, datasource_uid: str = DATASOURCE_UID) -> dict:
    """The Grafana-managed rule (file provisioning format) of one Prometheus alerting rule."""
    twin = twin_of(rule)
    refs: dict[str, str] = {}
    annotations = {k: translate_template(v, refs) for k, v in rule.get("annotations", {}).items()}
    annotations["description"] = annotations.get("description", "") + " Check first: " + twin.check_first
    annotations["__dashboardUid__"] = DASHBOARD_UID
    annotations["__panelId__"] = str(twin.panel_id)
    data = [_prometheus_query("A", rule["expr"].strip(), datasource_uid)]
    data += [_prometheus_query(ref, expr, datasource_uid) for ref, expr in refs.items()]
    data.append(_expression("B", {"type": "math", "expression": "is_number($A) || is_nan($A) || is_inf($A)"}))
    data.append(
        _expression(
            "C",
            {
                "type": "threshold",
                "expression": "B",
                "conditions": [{"type": "query", "evaluator": {"type": "gt", "params": [0]}}],
            },
        )
    )
    return {
        "uid": twin.uid,
        "title": twin.title,
        "condition": "C",
        "data": data,
        "dashboardUid": DASHBOARD_UID,
        "panelId": twin.panel_id,
        "noDataState": "OK",
        "execErrState": "Error",
        "for": str(rule.get("for", "0s")),
        "annotations": annotations,
        "labels": dict(rule.get("labels", {})),
        "isPaused": False,
    }


def build(alerts: Path = ALERTS, datasource_uid: str = DATASOURCE_UID) -> dict:
    """The whole provisioning file as a dict: one rule group with a twin of every Prometheus alert."""
    rules = prometheus_alert_rules(alerts)
    twins = [twin_of(r) for r in rules]
    unused = set(GRAFANA) - set(twins)
    if unused:
        raise ValueError(
            f"GRAFANA entries with no Prometheus rule in {alerts}: {sorted(t.uid for t in unused)}"
        )
    if len({t.uid for t in twins}) != len(twins) or len({t.title for t in twins}) != len(twins):
        raise ValueError("two Prometheus rules map to the same Grafana uid or title")
    group = {"orgId": 1, "name": GROUP, "folder": FOLDER, "interval": INTERVAL,
             "rules": [grafana_rule(r, datasource_uid) for r in rules]}  # fmt: skip
    return {"apiVersion": 1, "groups": [group]}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the PromQL expressions), as they are in alerts.yml."""


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# Grafana-managed alert rules (Grafana alerting file provisioning, apiVersion 1): the twins of
# the alerts of deploy/prometheus/alerts.yml, each tied to the dashboard panel that shows it.
# GENERATED by scripts/grafana_alerts.py from alerts.yml: do not edit; edit alerts.yml (or the
# script's GRAFANA table for uids, panels and "check first" lines) and run the script.
# Queries go to the data source with uid "{uid}" (deploy/grafana/provisioning/datasources),
# a Prometheus that loads alerts.yml (the queries use its recording rules).
# Validate: python scripts/check_grafana_alerting.py (deploy/README.md, "Grafana alerting").
"""


def render(alerts: Path = ALERTS, datasource_uid: str = DATASOURCE_UID) -> str:
    """The provisioning file's text."""
    body = yaml.dump(build(alerts, datasource_uid), Dumper=_Dumper, sort_keys=False, width=100,
                     allow_unicode=True)  # fmt: skip
    return HEADER.format(uid=datasource_uid) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--alerts", type=Path, default=ALERTS, help="Prometheus rule file (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="file to write (default: %(default)s)")
    parser.add_argument("--datasource-uid", default=DATASOURCE_UID,
                        help="uid of the Prometheus data source in Grafana (default: %(default)s)")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs")
    args = parser.parse_args(argv)
    try:
        text = render(args.alerts, args.datasource_uid)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"grafana_alerts: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), str(args.out), "generated"
            )
            sys.stdout.writelines(diff)
            print(f"{args.out} is out of date: run python scripts/grafana_alerts.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(build(args.alerts)['groups'][0]['rules'])} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
