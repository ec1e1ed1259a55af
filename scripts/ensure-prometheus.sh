#!/usr/bin/env bash
# Install Debian's prometheus (prometheus + promtool) for the alerting and scrape tests,
# when it is missing and we may install system packages. Otherwise those tests skip
# (or fail under CI=true, where they are required).
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Debian starts the packaged service where systemd runs; the tests start their own.
  exit 0
fi
echo "prometheus/promtool not installed and cannot install them (not root or no apt-get);" \
     "the Prometheus tests will be skipped" >&2
