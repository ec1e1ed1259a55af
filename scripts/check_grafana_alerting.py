"""Check Grafana alerting provisioning files against the pinned schema of Grafana's file format.

    python scripts/check_grafana_alerting.py                 # the files of deploy/grafana/provisioning/alerting
    python scripts/check_grafana_alerting.py FILE...         # any alerting provisioning files
    python scripts/check_grafana_alerting.py --self-test     # also: every deliberately broken copy must fail

Three layers, all offline, with the pinned ``jsonschema`` package:

1. Grafana's published definitions: the ``AlertingFileExport`` definitions of its alerting
   OpenAPI spec, copied unchanged into
   ``deploy/grafana/alerting-schema/grafana-api-export-definitions.json`` (source commit in the
   file); two overrides where the Go types marshal otherwise than the spec says: ``Duration``
   (int64 in the spec, "5m" in files) and ``Matchers`` (matcher strings in files).
   These are loose (no required fields, unknown keys allowed): types and enums.
2. The stricter JSON Schema ``alerting-file-v1.schema.json`` beside it, transcribed from the Go
   types Grafana's provisioning reader decodes the file into (SOURCES.md names each file and
   commit): unknown keys, required fields, durations, uids, expression models.
3. What a schema cannot say but Grafana checks when it loads the rules: the condition and every
   ``$X`` / ``expression`` reference name a refId of the same rule; refIds, rule uids and titles
   (per folder) are unique; the group interval is a multiple of Grafana's 10 s base interval;
   a rule linked to a panel has ``dashboardUid`` and ``panelId`` and matching
   ``__dashboardUid__``/``__panelId__`` annotations; data source queries have a time range with
   from > to; policies route to contact points defined in the file (or Grafana's default one);
   and no ``$`` that Grafana's provisioning would expand as an environment variable sits in a
   field it expands (``$labels`` in a label value would be emptied), nor ``${`` in annotations.

Exit status 0 when every file passes, 1 otherwise (each problem is printed with its file and
path), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "deploy" / "grafana" / "alerting-schema" / "alerting-file-v1.schema.json"
PUBLISHED = SCHEMA.parent / "grafana-api-export-definitions.json"
ALERTING_DIR = REPO / "deploy" / "grafana" / "provisioning" / "alerting"
BASE_INTERVAL_SECONDS = 10  # Grafana's [unified_alerting] base_interval (not configurable since 9)
DEFAULT_RECEIVER = "grafana-default-email"  # the contact point every Grafana org starts with
# libyaml's parser when PyYAML has it (same results, ~10x faster for the self-test's copies).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

__all__ = ["check_document", "check_file", "main", "self_test"]

_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# `$NAME` or `${NAME}` not preceded by another `$` (`$$` is Grafana's escape for a literal `$`).
_ENV_VAR = re.compile(r"(?<!\$)\$(?:\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_REF_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _seconds(duration: str) -> float | None:
    m = _DURATION.fullmatch(duration)
    if not m or duration == "":
        return 0.0 if duration == "0" else None
    return sum(int(v) * u for v, u in zip(m.groups(), _UNIT_SECONDS, strict=True) if v)


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)  # a broken pinned schema is an error, not a pass
    return Draft202012Validator(schema)


@functools.cache
def _published_validator() -> Any:
    from jsonschema import Draft4Validator  # the spec is Swagger 2.0, whose schemas are draft 4's

    definitions = dict(json.loads(PUBLISHED.read_text())["definitions"])
    # Two overrides, where Go types marshal to something else than the spec says: model.Duration is
    # a string ("5m"), and Alertmanager's labels.Matchers are matcher strings ('severity="critical"').
    definitions["Duration"] = {"type": "string", "description": "override: a duration string such as 5m"}
    definitions["Matchers"] = {"type": "array", "items": {"type": "string"}, "description": "override"}
    schema = {"$ref": "#/definitions/AlertingFileExport", "definitions": definitions}
    Draft4Validator.check_schema(schema)
    return Draft4Validator(schema)


def _schema_errors(doc: Any) -> Iterator[str]:
    published = _published_validator().iter_errors(doc)
    for err in sorted(published, key=lambda e: list(map(str, e.absolute_path))):
        yield f"{'/'.join(map(str, err.absolute_path)) or '(top)'}: {err.message} (Grafana's published definitions)"
    for err in sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = "/".join(map(str, err.absolute_path)) or "(top)"
        # anyOf/oneOf/if-then errors carry their specific causes in `context`.
        causes = sorted({c.message for c in err.context or []})
        detail = f" ({'; '.join(causes[:3])})" if causes else ""
        yield f"{path}: {err.message}{detail}"


def _semantic_errors(doc: dict) -> Iterator[str]:
    uids: dict[str, str] = {}
    titles: set[tuple[str, str]] = set()
    for gi, group in enumerate(doc.get("groups", [])):
        gpath = f"groups/{gi}"
        interval = _seconds(str(group.get("interval", "")))
        if interval is not None and (interval <= 0 or interval % BASE_INTERVAL_SECONDS):
            yield f"{gpath}/interval: {group['interval']!r} is not a positive multiple of Grafana's {BASE_INTERVAL_SECONDS} s base interval"
        for field in ("name", "folder", "interval"):
            yield from _no_env(f"{gpath}/{field}", group.get(field))
        for ri, rule in enumerate(group.get("rules", [])):
            yield from _rule_errors(f"{gpath}/rules/{ri}", rule, group.get("folder", ""), uids, titles)
    receivers = {cp.get("name") for cp in doc.get("contactPoints", [])} | {DEFAULT_RECEIVER}
    receiver_uids: set[str] = set()
    for ci, cp in enumerate(doc.get("contactPoints", [])):
        for ri, r in enumerate(cp.get("receivers", [])):
            if r.get("uid") in receiver_uids:
                yield f"contactPoints/{ci}/receivers/{ri}/uid: {r['uid']!r} is used twice"
            receiver_uids.add(r.get("uid"))
    for pi, policy in enumerate(doc.get("policies", [])):
        for path, route in _routes(f"policies/{pi}", policy):
            if "receiver" in route and route["receiver"] not in receivers:
                yield (f"{path}/receiver: {route['receiver']!r} is not a contact point of this file "
                       f"(nor {DEFAULT_RECEIVER!r}); Grafana rejects a policy tree with an unknown receiver")  # fmt: skip


def _routes(path: str, route: dict) -> Iterator[tuple[str, dict]]:
    if isinstance(route, dict):
        yield path, route
        for i, sub in enumerate(route.get("routes", []) or []):
            yield from _routes(f"{path}/routes/{i}", sub)


def _no_env(path: str, value: Any, braced_only: bool = False) -> Iterator[str]:
    if not isinstance(value, str):
        return
    for m in _ENV_VAR.finditer(value):
        if braced_only and not m.group().startswith("${"):
            continue
        yield (f"{path}: {m.group()!r} would be replaced by an environment variable when Grafana "
               "provisions the file (write $$ for a literal $)")  # fmt: skip


def _rule_errors(path: str, rule: dict, folder: str, uids: dict[str, str], titles: set) -> Iterator[str]:
    if not isinstance(rule, dict):
        return
    uid, title = rule.get("uid"), rule.get("title")
    if uid in uids:
        yield f"{path}/uid: {uid!r} is also the uid of {uids[uid]}"
    uids.setdefault(uid, path)
    if (folder, title) in titles:
        yield f"{path}/title: {title!r} is used twice in folder {folder!r} (Grafana requires unique titles per folder)"
    titles.add((folder, title))
    for field in ("uid", "title", "condition", "dashboardUid", "noDataState", "execErrState", "for"):
        yield from _no_env(f"{path}/{field}", rule.get(field))
    for k, v in (rule.get("labels") or {}).items():
        yield from _no_env(f"{path}/labels/{k}", v)
    annotations = rule.get("annotations") or {}
    for k, v in annotations.items():
        yield from _no_env(f"{path}/annotations/{k}", v, braced_only=True)

    data = [q for q in rule.get("data", []) if isinstance(q, dict)]
    refs = [q.get("refId") for q in data]
    for dup in sorted({r for r in refs if refs.count(r) > 1}, key=str):
        yield f"{path}/data: refId {dup!r} is used twice"
    if "condition" in rule and rule["condition"] not in refs:
        yield f"{path}/condition: {rule['condition']!r} is not the refId of any query or expression ({refs})"
    for qi, q in enumerate(data):
        qpath = f"{path}/data/{qi}"
        yield from _no_env(f"{qpath}/refId", q.get("refId"))
        yield from _no_env(f"{qpath}/datasourceUid", q.get("datasourceUid"))
        model = q.get("model") if isinstance(q.get("model"), dict) else {}
        if model.get("refId", q.get("refId")) != q.get("refId"):
            yield f"{qpath}/model/refId: {model.get('refId')!r} differs from the query's refId {q.get('refId')!r}"
        if q.get("datasourceUid") == "__expr__":
            expression = str(model.get("expression", ""))
            needed = set(_REF_VAR.findall(expression)) if model.get("type") == "math" else {expression}
            for name in sorted(needed - set(refs)):
                yield f"{qpath}/model/expression: refers to {name!r}, which is not a refId of this rule"
            if q.get("refId") in needed:
                yield f"{qpath}/model/expression: refers to itself"
        else:
            tr = q.get("relativeTimeRange") or {}
            if isinstance(tr.get("from"), int) and isinstance(tr.get("to"), int) and tr["from"] <= tr["to"]:
                yield f"{qpath}/relativeTimeRange: from ({tr['from']}) must be greater than to ({tr['to']})"

    linked = {k for k in ("dashboardUid", "panelId") if k in rule}
    if linked and linked != {"dashboardUid", "panelId"}:
        yield f"{path}: a rule linked to a dashboard needs both dashboardUid and panelId (has {sorted(linked)})"
    for field, annotation in (("dashboardUid", "__dashboardUid__"), ("panelId", "__panelId__")):
        if annotation in annotations and str(rule.get(field)) != annotations[annotation]:
            yield f"{path}/annotations/{annotation}: {annotations[annotation]!r} differs from {field} {rule.get(field)!r}"


def check_document(doc: Any) -> list[str]:
    """Problems of one parsed provisioning document (empty when it is valid)."""
    errors = list(_schema_errors(doc))
    if isinstance(doc, dict):
        errors += list(_semantic_errors(doc))
    return errors


def check_file(path: Path) -> list[str]:
    """Problems of one provisioning file, each prefixed with the file name."""
    try:
        doc = yaml.load(path.read_text(), Loader=_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: cannot read it as YAML: {exc}"]
    return [f"{path}: {e}" for e in check_document(doc)]


# --------------------------------------------------------------------------- self-test


def _rule(doc: dict) -> dict:
    return doc["groups"][0]["rules"][0]


def _node(doc: dict, ref: str) -> dict:
    return next(q for q in _rule(doc)["data"] if q["refId"] == ref)


#: (what is wrong, mutation in place) for a rules file; each broken copy must be rejected.
RULE_MUTATIONS: list[tuple[str, Callable[[dict], None]]] = [
    ("misspelled rule key", lambda d: _rule(d).update(conditon=_rule(d).pop("condition"))),
    ("unknown top-level key", lambda d: d.update(group=d.pop("groups"))),
    ("apiVersion 2", lambda d: d.update(apiVersion=2)),
    ("for: '10 minutes'", lambda d: _rule(d).update({"for": "10 minutes"})),
    ("noDataState: Ok", lambda d: _rule(d).update(noDataState="Ok")),
    ("rule without uid", lambda d: _rule(d).pop("uid")),
    ("uid with a space", lambda d: _rule(d).update(uid="cxr monitor drift")),
    ("uid of 41 characters", lambda d: _rule(d).update(uid="x" * 41)),
    ("empty title", lambda d: _rule(d).update(title=" ")),
    ("title of 191 characters", lambda d: _rule(d).update(title="t" * 191)),
    ("no data", lambda d: _rule(d).update(data=[])),
    ("condition names no refId", lambda d: _rule(d).update(condition="D")),
    (
        "threshold type 'above'",
        lambda d: _node(d, "C")["model"]["conditions"][0]["evaluator"].update(type="above"),
    ),
    (
        "threshold without params",
        lambda d: _node(d, "C")["model"]["conditions"][0]["evaluator"].update(params=[]),
    ),
    (
        "two threshold conditions",
        lambda d: _node(d, "C")["model"]["conditions"].append(
            copy.deepcopy(_node(d, "C")["model"]["conditions"][0])
        ),
    ),
    ("math node without expression", lambda d: _node(d, "B")["model"].pop("expression")),
    ("math refers to unknown $Z", lambda d: _node(d, "B")["model"].update(expression="is_number($Z)")),
    ("unknown expression type", lambda d: _node(d, "B")["model"].update(type="maths")),
    (
        "misspelled Prometheus model key",
        lambda d: _node(d, "A")["model"].update(exp=_node(d, "A")["model"].pop("expr")),
    ),
    ("model refId differs", lambda d: _node(d, "A")["model"].update(refId="Q")),
    ("query without time range", lambda d: _node(d, "A").pop("relativeTimeRange")),
    ("time range from <= to", lambda d: _node(d, "A").update(relativeTimeRange={"from": 0, "to": 600})),
    ("duplicate refId", lambda d: _node(d, "B").update(refId="A")),
    ("numeric annotation", lambda d: _rule(d)["annotations"].update(__panelId__=30)),
    ("__panelId__ differs from panelId", lambda d: _rule(d)["annotations"].update(__panelId__="999")),
    ("panelId without dashboardUid", lambda d: _rule(d).pop("dashboardUid")),
    ("panelId as a string", lambda d: _rule(d).update(panelId="30")),
    ("$labels in a label value", lambda d: _rule(d)["labels"].update(instance="{{ $labels.instance }}")),
    ("${VAR} in an annotation", lambda d: _rule(d)["annotations"].update(summary="see ${RUNBOOK}")),
    ("interval 15s (not a multiple of 10 s)", lambda d: d["groups"][0].update(interval="15s")),
    ("group without folder", lambda d: d["groups"][0].pop("folder")),
    ("duplicate rule uid", lambda d: d["groups"][0]["rules"].append(copy.deepcopy(_rule(d)))),
    ("isPaused as a string", lambda d: _rule(d).update(isPaused="no")),
    ("label value not a string", lambda d: _rule(d)["labels"].update(priority=1)),
]

#: The same for a file with contact points and a notification policy.
NOTIFICATION_MUTATIONS: list[tuple[str, Callable[[dict], None]]] = [
    ("contact point without name", lambda d: d["contactPoints"][0].pop("name")),
    ("receiver without uid", lambda d: d["contactPoints"][0]["receivers"][0].pop("uid")),
    ("unknown receiver type", lambda d: d["contactPoints"][0]["receivers"][0].update(type="e-mail")),
    (
        "e-mail receiver without addresses",
        lambda d: d["contactPoints"][0]["receivers"][0]["settings"].pop("addresses"),
    ),
    ("misspelled policy key", lambda d: d["policies"][0].update(group_bye=d["policies"][0].pop("group_by"))),
    ("policy to an unknown contact point", lambda d: d["policies"][0].update(receiver="nobody")),
    (
        "bad matcher operator",
        lambda d: d["policies"][0]["routes"][0]["object_matchers"][0].__setitem__(1, "=="),
    ),
    ("bad repeat_interval", lambda d: d["policies"][0].update(repeat_interval="4 hours")),
]


def self_test(files: list[Path]) -> list[str]:
    """Check that each file passes and each broken copy of it fails; returns the failures."""
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            base = yaml.load(path.read_text(), Loader=_LOADER)
            if check_document(base):
                failures.append(f"{path}: the unmodified file does not pass")
                continue
            mutations = (RULE_MUTATIONS if "groups" in base else []) + (
                NOTIFICATION_MUTATIONS if "contactPoints" in base else []
            )
            for i, (what, mutate) in enumerate(mutations):
                doc = copy.deepcopy(base)
                mutate(doc)
                broken = Path(tmp) / f"{i:02d}-{path.name}"
                broken.write_text(yaml.dump(doc, Dumper=_DUMPER, sort_keys=False))
                errors = check_file(broken)
                status = "rejected" if errors else "ACCEPTED"
                print(
                    f"  {status}: {path.name}: {what}"
                    + (f"  <- {errors[0].split(': ', 1)[1]}" if errors else "")
                )
                if not errors:
                    failures.append(f"{path}: broken copy accepted: {what}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("files", nargs="*", type=Path, help=f"default: every *.yaml of {ALERTING_DIR}")
    parser.add_argument("--self-test", action="store_true",
                        help="also require every deliberately broken copy of each file to fail")  # fmt: skip
    args = parser.parse_args(argv)
    files = args.files or sorted(ALERTING_DIR.glob("*.yaml"))
    if not files:
        print(f"check_grafana_alerting: no files given and none in {ALERTING_DIR}", file=sys.stderr)
        return 2
    problems = [p for f in files for p in check_file(f)]
    for p in problems:
        print(p)
    if args.self_test and not problems:
        problems = self_test(files)
        for p in problems:
            print(p)
    print(
        f"{len(files)} file(s): " + ("OK" if not problems else f"{len(problems)} problem(s)"), file=sys.stderr
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
