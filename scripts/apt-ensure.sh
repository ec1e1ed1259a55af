#!/usr/bin/env bash
# Sourced by the scripts/ensure-*.sh scripts: install Debian packages that tests need, when a
# command is missing and we may install system packages (root with apt-get); otherwise say which
# tests will skip (they fail instead under CI=true, where they are required).
#
#   source "$(dirname "${BASH_SOURCE[0]}")/apt-ensure.sh"
#   ensure_debian_packages "COMMAND..." "PACKAGE..." "what is missing" "the tests that skip"

# ensure_debian_packages COMMANDS PACKAGES WHAT SKIPPED
#   COMMANDS  space-separated commands that must all be on PATH (nothing to do when they are)
#   PACKAGES  space-separated Debian packages providing them
#   WHAT      how the message names the missing software, e.g. "openssl"
#   SKIPPED   which tests skip without it, e.g. "the TLS tests"
ensure_debian_packages() {
  local commands=$1 packages=$2 what=$3 skipped=$4 cmd missing=0
  for cmd in $commands; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
  done
  if [ "$missing" = "0" ]; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt-get install -y -qq --no-install-recommends $packages >/dev/null
    return 0
  fi
  local them="them"
  [ "$(wc -w <<<"$packages")" = "1" ] && them="it"
  echo "$what not installed and cannot install $them (not root or no apt-get);" \
       "$skipped will be skipped" >&2
}
