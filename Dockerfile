# Stub until the ops issue finishes it (CUDA base image, `sida serve`, healthcheck).
# Today it packages the CLI and the embedded demo model on CPU:
#   docker build -t sida . && docker run --rm sida classify "a gorgeous , witty movie ."
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY predictor predictor
COPY offload offload
COPY configs configs
COPY models models
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir .
ENTRYPOINT ["sida"]
CMD ["--help"]
