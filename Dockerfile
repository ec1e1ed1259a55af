# The cxr-monitor gRPC sidecar with the bundled NIH model.
#
#   docker build -t cxr-spectral-monitor:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9108:9108 cxr-spectral-monitor:0.1.0
#
# Two stages so that pip, its caches and the sources stay out of the runtime image.
# Every dependency is a manylinux wheel (pyFFTW and the pylibjpeg decoders bundle
# their C libraries), so no compiler is needed in either stage.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned set first: this layer is reused while only the sources change. The lock also pins
# the test tools (the `test` extra: pytest, ruff, grpcio-tools with its setuptools, PyYAML,
# jsonschema, and pytest's iniconfig, pluggy, Pygments, jsonschema's attrs,
# jsonschema-specifications, referencing, rpds-py); they are left out of the image
# (grpcio-tools would also want a newer setuptools than the venv's). --no-deps: the lock is the
# complete set; `pip check` below fails the build if it is not.
COPY requirements.lock ./
RUN grep -v -i -E '^(pytest|ruff|grpcio-tools|setuptools|pyyaml|iniconfig|pluggy|pygments|jsonschema|jsonschema-specifications|referencing|rpds-py|attrs)==' requirements.lock > runtime.lock \
    && pip install --no-deps -r runtime.lock
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
RUN pip install --no-deps . \
    && pip check \
    && cxr-monitor --version

FROM ${PYTHON_IMAGE}
ARG UID=10001
# No .pyc writes (read-only root file systems), unbuffered logs, the venv on PATH,
# matplotlib's cache in /tmp (its default is the non-existent home directory).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CXR_MONITOR_MODEL=/opt/cxr-monitor/models/default
RUN groupadd --system --gid ${UID} cxr \
    && useradd --system --uid ${UID} --gid cxr --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cxr
COPY --from=build /opt/venv /opt/venv
# The model is data, not code: owned by root and read-only for the service user.
COPY models/default/ /opt/cxr-monitor/models/default/
# Where CXR_MONITOR_STORE points in deploy/: a volume mounted here starts owned by the service user.
RUN mkdir -p /var/lib/cxr-monitor && chown ${UID}:${UID} /var/lib/cxr-monitor
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9108 11112
# No --address: `health` asks 127.0.0.1 on the port serve uses (CXR_MONITOR_PORT, else 50051).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["cxr-monitor", "health"]
# Exec form: the server is PID 1 and receives SIGTERM itself for a graceful stop.
ENTRYPOINT ["cxr-monitor"]
CMD ["serve"]
