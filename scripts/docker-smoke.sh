#!/usr/bin/env bash
# Build the sidecar image and check it the way an orchestrator would use it:
# read-only root file system, non-root user, HEALTHCHECK turns healthy on a
# non-default port, a JPEG 2000 DICOM is scored, /metrics answers, and SIGTERM
# (docker stop) ends the container with exit status 0.
#
#   bash scripts/docker-smoke.sh [PYTHON_IMAGE]
#
# PYTHON_IMAGE: the base image (default: the Dockerfile's python:3.11-slim). Needs a
# Docker engine, the repo's venv (make install) for the client, and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."

image=cxr-spectral-monitor:smoke
name=cxr-monitor-smoke-$$
port=50061
metrics=9161
dicom=../shared/data/dicom/cxr_pa_cr_philips_j2k.dcm
build_args=()
[[ $# -ge 1 ]] && build_args=(--build-arg "PYTHON_IMAGE=$1")

cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Host networking: the check also runs where Docker has no bridge network.
docker build --network host "${build_args[@]}" -t "$image" .
docker run -d --name "$name" --network host --read-only --tmpfs /tmp --cpus 2 \
    --health-interval 2s --health-start-period 5s \
    -e CXR_MONITOR_PORT=$port -e CXR_MONITOR_METRICS_PORT=$metrics "$image" >/dev/null

for _ in $(seq 60); do
    status=$(docker inspect --format '{{.State.Health.Status}}' "$name")
    [[ $status == healthy ]] && break
    sleep 1
done
[[ $status == healthy ]] || { echo "FAIL: health is $status"; docker logs "$name"; exit 1; }
echo "ok: healthy on port $port (HEALTHCHECK: cxr-monitor health)"

user=$(docker exec "$name" id -u)
[[ $user != 0 ]] || { echo "FAIL: runs as root"; exit 1; }
echo "ok: runs as uid $user on a read-only root file system"

docker logs "$name" 2>&1 | grep -q '"decode_process_count":2' \
    || { echo "FAIL: decode_processes auto did not resolve to 2 with --cpus 2"; exit 1; }
echo "ok: --decode-processes auto = 2 with --cpus 2"

.venv/bin/cxr-monitor client score --address "127.0.0.1:$port" "$dicom"
curl -fsS "http://127.0.0.1:$metrics/metrics" | grep -q '^cxr_monitor_images_scored_total 1.0' \
    || { echo "FAIL: /metrics does not count the image"; exit 1; }
echo "ok: scored a JPEG 2000 DICOM, /metrics counts it"

docker stop "$name" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
[[ $code == 0 ]] || { echo "FAIL: exit status $code after SIGTERM"; docker logs "$name" | tail; exit 1; }
docker logs "$name" 2>&1 | grep -q '"msg":"stopped"' || { echo "FAIL: no graceful stop in the log"; exit 1; }
echo "ok: SIGTERM -> graceful stop, exit 0"
echo "PASS"
