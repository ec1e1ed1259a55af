#!/usr/bin/env bash
# Install Debian's dcmtk (echoscu, storescu) and orthanc (a real PACS) for the DICOM node
# tests, when they are missing and we may install system packages. Otherwise those tests
# skip (or fail under CI=true, where they are required).
set -euo pipefail
if command -v storescu >/dev/null 2>&1 && command -v echoscu >/dev/null 2>&1 \
   && command -v Orthanc >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends dcmtk orthanc >/dev/null
  # Debian starts the packaged Orthanc service where systemd runs; the tests start their own
  # on other ports, so it does not matter whether that one is running.
  exit 0
fi
echo "dcmtk/orthanc not installed and cannot install them (not root or no apt-get);" \
     "the DICOM node tests with real components will be skipped" >&2
