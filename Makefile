# sida — two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SIDA := $(VENV)/bin/sida
STAMP := $(VENV)/.sida-installed
DATA ?= ../shared/data
MODEL ?= models/sida-switch-demo
# CPU machines: this exact pin resolves to a CPU build; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: run demo test test-fast install demo-model demo-card demo-predictor bench bench-decode bench-memory bench-serve-memory replicas demo-olmoe demo-olmoe-ahead demo-olmoe-card bench-gpu test-gpu bench-http soak chaos lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

run: $(STAMP)
	$(SIDA) serve --model $(MODEL) --host 127.0.0.1 --port 8000

# The CLI on the demo model, without the server.
demo: $(STAMP)
	$(SIDA) classify --model $(MODEL) \
		"a gorgeous , witty , seductive movie ." \
		"the plot is nothing but boilerplate clichés from start to finish ." \
		"it's a charming and often affecting journey."
	$(SIDA) complete --model $(MODEL) --max-tokens 24 \
		"the city council voted on tuesday to" \
		"this recipe is easy to make and"

test: $(STAMP) prometheus
	$(PY) -m pytest -q

# The edit loop: everything but the tests marked `slow` (whole datasets, live servers, Prometheus, Ray, locust).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Rebuild the embedded demo model from $(DATA) (stages 1-4, about 75 minutes on 2 CPU cores), its model card and predictor.
demo-model: $(STAMP)
	$(SIDA) build-demo --data $(DATA) --out $(MODEL)
	$(MAKE) demo-card demo-predictor

demo-card: $(STAMP)
	$(SIDA) build-demo --stage card --out $(MODEL) --data $(DATA)

# The decoder-only demo model (OLMoE: every layer MoE, top-2 of 16 experts): 30 minutes of training on one CPU
# thread, then its predictor (router traces of C4/SST-2/MRPC train text), its decode-step predictor and its model
# card; checkpoints in
# runs/olmoe-demo. Serve it with `make run MODEL=models/sida-olmoe-demo`.
OLMOE_MODEL ?= models/sida-olmoe-demo
demo-olmoe: $(STAMP)
	mkdir -p runs
	$(PY) -m sida.demo_model.decoder_lm --data $(DATA) --out $(OLMOE_MODEL) --minutes 30 --torch-threads 1

# Rebuild only the decoder-only demo's decode-step predictor (predictor/ahead.safetensors; about 2 minutes).
demo-olmoe-ahead: $(STAMP)
	$(PY) -m sida.demo_model.decoder_lm --data $(DATA) --out $(OLMOE_MODEL) --stage ahead --torch-threads 2

demo-olmoe-card: $(STAMP)
	$(PY) -m sida.demo_model.decoder_lm --data $(DATA) --out $(OLMOE_MODEL) --stage card --torch-threads 1

# Rebuild the demo model's predictor: router traces on SST-2/MRPC train and the C4 sample, then training;
# then the decoder layers' per-step table (experts by decoder input token).
demo-predictor: $(STAMP)
	mkdir -p runs
	$(SIDA) predictor trace --model $(MODEL) --data $(DATA)/sst2/train.tsv --limit 30000 \
		--data $(DATA)/mrpc/train.tsv --limit 3668 --data $(DATA)/c4_sample/c4_sample.jsonl --limit 1000 \
		--out runs/demo-traces.safetensors
	$(SIDA) predictor train --model $(MODEL) --traces runs/demo-traces.safetensors --out $(MODEL)/predictor \
		--checkpoint runs/demo-predictor.ckpt
	$(SIDA) predictor decoder --model $(MODEL) --data $(DATA) --out $(MODEL)/predictor

# SiDA against resident / accelerate / lru / layered / the oracle on the same batches: the CPU preset (experts in RAM)
# and the disk preset (experts read from disk with O_DIRECT, batch sizes 1/8/32, the 25% budget also with reads paced
# to 1 GB/s; each disk row against Belady's reads): bench/results/cpu.json and cpu-disk.json, then the tables and
# plots in docs/benchmarks.md (about 50 minutes on 2 cores; a progress bar on a terminal). The switch-base-8
# predictor is trained on the first run and kept in runs/.
bench: $(STAMP)
	$(PY) bench/offload_bench.py --preset cpu --out bench/results/cpu.json
	$(PY) bench/report.py bench/results/cpu.json --doc docs/benchmarks.md --plots docs/img
	$(PY) bench/offload_bench.py --preset cpu-disk --out bench/results/cpu-disk.json
	$(PY) bench/report.py bench/results/cpu-disk.json --doc docs/benchmarks.md --plots docs/img

# Peak host memory of `sida eval`, all-resident against offloaded (ram tier, disk tier fresh and again), on a
# switch-base-8 shape with random weights written once under runs/ (about 3 minutes on 2 cores).
# Decode: continuous against static batching through `sida serve` (16 streams), then every offload method on decode
# steps (resident, lru, layered, static hot set, exact with the decode-step predictor), on the decoder-only demo
# (about 15 minutes); rows in bench/results/cpu-decode.json. The replica rows: docs/benchmarks.md#decode.
bench-decode: $(STAMP)
	for L in fixed natural mixed; do $(PY) bench/decode_bench.py --lengths $$L; done
	$(PY) bench/decode_offload.py --budgets 0.1,0.25,0.5 --streams 1,4
	$(PY) bench/decode_offload.py --tier disk --expert-dir runs/expert-cache --budgets 0.1,0.25,0.5 --streams 1,4

bench-memory: $(STAMP)
	$(PY) bench/memory_bench.py --experts 8 --budget-experts 24 --out bench/results/memory.json

# Random-weight bf16 replicas of OLMoE-1B-7B (8 of its 16 layers, 7.1 GB) and Qwen3-30B-A3B (4 of its 48 layers,
# 6.2 GB) under runs/replicas/, written streaming (about 1 minute; skipped when already written).
replicas: $(STAMP)
	$(PY) bench/replicas.py olmoe-1b-7b
	$(PY) bench/replicas.py qwen3-30b-a3b

# `sida serve` on the OLMoE replica: peak RSS offloaded (disk tier, 64 of 512 experts) against all-resident, and
# the same greedy tokens from /v1/completions (about 5 minutes on 2 cores).
bench-serve-memory: replicas
	$(PY) bench/serve_memory.py --model runs/replicas/olmoe-1b-7b-8l --budget-experts 64 \
		--out bench/results/serve-memory-olmoe.json

# On a GPU box: the CUDA tests (marked `gpu`), after the device, torch and CUDA versions.
test-gpu: $(STAMP)
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
	$(PY) -m pytest -q -m gpu -rs

# On a GPU box: the full matrix, one model × dtype × batch size per invocation (each under 10 minutes is the
# aim; not yet run on a GPU), appended to bench/results/gpu.json.
bench-gpu: $(STAMP)
	rm -f bench/results/gpu.json
	$(PY) bench/offload_bench.py --preset gpu --models demo --out bench/results/gpu.json --append
	for m in switch-base-64 switch-base-128 switch-base-256; do for d in float16 bfloat16; do for b in 32 1; do \
		$(PY) bench/offload_bench.py --preset gpu --models $$m --dtypes $$d --batch-sizes $$b \
			--out bench/results/gpu.json --append || exit 1; done; done; done
	$(PY) bench/report.py bench/results/gpu.json --doc docs/benchmarks.md --plots docs/img

# HTTP throughput against `sida eval` on the same sentences (issue: serving daemon).
bench-http: $(STAMP)
	$(PY) bench/http_vs_eval.py --data $(DATA)/sst2/dev.tsv

# Soak: SOAK_S seconds of mixed classify / completion / streaming traffic against `sida serve` on $(MODEL), on
# loopback; fails on any failed call or on server memory (RSS; CUDA memory) that keeps growing.
SOAK_S ?= 120
soak: $(STAMP)
	$(PY) bench/soak.py --model $(MODEL) --duration $(SOAK_S)

# Chaos: disk-tier reads failing at 1% and 10% and stalling at random, one byte of the expert file flipped, under mixed
# traffic; every answer equals the resident server's or is a 5xx envelope (bench/chaos.py). Rows: bench/results/cpu-chaos.json
chaos: $(STAMP)
	for R in 0.01 0.1; do $(PY) bench/chaos.py --model $(MODEL) --fail-rate $$R --out bench/results/cpu-chaos.json || exit 1; done

# Load test: `sida serve` on $(MODEL) on loopback, then locust headless for LOADTEST_TIME with LOADTEST_USERS users
# (classify SST-2 / MRPC, completions, streamed completions on texts from $(DATA)); CSV files and report.html in
# runs/loadtest/. Fails on the error ratio or a p95 over its limit (loadtest/README.md; remote servers there too).
LOADTEST_TIME ?= 60s
LOADTEST_USERS ?= 8
.PHONY: loadtest
loadtest: $(STAMP)
	$(PY) loadtest/run.py --model $(MODEL) --data $(DATA) --run-time $(LOADTEST_TIME) --users $(LOADTEST_USERS) \
		--out runs/loadtest

lint: $(STAMP)
	$(VENV)/bin/ruff check server predictor offload demo_model tests bench docker loadtest
	$(VENV)/bin/ruff format --check server predictor offload demo_model tests bench docker loadtest
	$(VENV)/bin/hadolint Dockerfile

# Prometheus and promtool for tests/ops/test_prometheus.py (Debian's package, installed where missing). Without
# root or apt this prints a line and goes on: that test is then skipped, with the reason.
.PHONY: prometheus dashboard
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; } || echo "prometheus not installed (needs root and apt): its tests will be skipped"

# docs/img/dashboard.png: the Grafana dashboard's panels drawn from their PromQL, after a minute of mixed traffic
# against `sida serve` on $(MODEL) with Prometheus scraping it (both on loopback).
dashboard: $(STAMP) prometheus
	$(PY) docker/render_dashboard.py --model $(MODEL) --out docs/img/dashboard.png

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
