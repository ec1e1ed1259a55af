#!/usr/bin/env bash
# Install Debian's openssl command, which the TLS tests use to make their certificates (a CA,
# server and client certificates, a second CA), when it is missing and we may install system
# packages. Otherwise those tests skip (or fail under CI=true, where they are required).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/apt-ensure.sh"
ensure_debian_packages "openssl" "openssl" "openssl" "the TLS tests"
