# gateway.py as a container: small, non-root, PID 1, no network needed at run time.
#   docker build -t gateway-py .
#   docker run --rm -p 4000:4000 -e OPENAI_API_KEY gateway-py
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md gateway.py ./
RUN pip install '.[redis]' \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway

USER 10001
# Inside a container the gateway must be reachable from outside it; 127.0.0.1 stays the
# default everywhere else.
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=4000
EXPOSE 4000

# No curl in the image: the gateway probes itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["gateway", "--probe", "/health"]

# Exec form: the gateway is PID 1 and gets SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["gateway"]
