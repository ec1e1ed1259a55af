#!/usr/bin/env bash
# Install Debian's openssl command, which the TLS tests use to make their certificates (a CA,
# server and client certificates, a second CA), when it is missing and we may install system
# packages. Otherwise those tests skip (or fail under CI=true, where they are required).
set -euo pipefail
if command -v openssl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends openssl >/dev/null
  exit 0
fi
echo "openssl not installed and cannot install it (not root or no apt-get);" \
     "the TLS tests will be skipped" >&2
