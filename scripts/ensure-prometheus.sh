#!/usr/bin/env bash
# Install Debian's prometheus (prometheus + promtool) for the alerting and scrape tests,
# when it is missing and we may install system packages. Otherwise those tests skip
# (or fail under CI=true, where they are required).
# Debian starts the packaged service where systemd runs; the tests start their own.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/apt-ensure.sh"
ensure_debian_packages "promtool prometheus" "prometheus" "prometheus/promtool" "the Prometheus tests"
