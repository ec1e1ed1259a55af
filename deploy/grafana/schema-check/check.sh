#!/usr/bin/env bash
# Type-checks the Grafana dashboard against Grafana's published schema (@grafana/schema, pinned
# in package.json / package-lock.json). Needs Node >= 18 and npm (the npm registry on first run).
#
#   bash deploy/grafana/schema-check/check.sh                  # deploy/grafana/dashboards/cxr-monitor.json
#   bash deploy/grafana/schema-check/check.sh other.json       # any dashboard JSON file
#   bash deploy/grafana/schema-check/check.sh --self-test      # also prove that broken copies fail
#
# Exit status: 0 when the dashboard passes (and the self-test, if asked), 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dashboard="$(cd "$here/../dashboards" && pwd)/cxr-monitor.json"
self_test=0
for arg in "$@"; do
  case "$arg" in
    --self-test) self_test=1 ;;
    -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) dashboard="$(cd "$(dirname "$arg")" && pwd)/$(basename "$arg")" ;;
  esac
done
[[ -f "$dashboard" ]] || { echo "no such file: $dashboard" >&2; exit 2; }

cd "$here"
start=$SECONDS
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
schema_version="$(node -p 'require("./node_modules/@grafana/schema/package.json").version')"
tsc_version="$(node_modules/.bin/tsc --version)"
echo "checking $dashboard"
echo "against @grafana/schema $schema_version with TypeScript ${tsc_version#Version }"

mkdir -p generated
node generate.mjs "$dashboard" generated/dashboard.ts
if npx tsc --noEmit -p . --pretty false >generated/tsc.log 2>&1; then
  echo "PASS: the dashboard matches @grafana/schema $schema_version ($((SECONDS - start)) s)"
  status=0
else
  node generate.mjs --explain generated/dashboard.ts generated/tsc.log
  errors="$(grep -c 'error TS' generated/tsc.log || true)"
  echo "FAIL: $errors type error(s) against @grafana/schema $schema_version (tsc may report only the"
  echo "      first problem inside one object: fix and run again)"
  status=1
fi

if ((self_test)); then
  node selftest.mjs "$dashboard" || status=1
  echo "($((SECONDS - start)) s in all)"
fi
exit "$status"
