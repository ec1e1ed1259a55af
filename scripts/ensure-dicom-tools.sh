#!/usr/bin/env bash
# Install Debian's dcmtk (echoscu, storescu) and orthanc (a real PACS) for the DICOM node
# tests, when they are missing and we may install system packages. Otherwise those tests
# skip (or fail under CI=true, where they are required).
# Debian starts the packaged Orthanc service where systemd runs; the tests start their own
# on other ports, so it does not matter whether that one is running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/apt-ensure.sh"
ensure_debian_packages "storescu echoscu Orthanc" "dcmtk orthanc" "dcmtk/orthanc" \
  "the DICOM node tests with real components"
