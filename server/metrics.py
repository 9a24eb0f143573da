"""Prometheus series (prefix `sida_`, base units; names of DESIGN.md §7).

Request-side series are observed by the HTTP layer and the workers. Expert and hash counters are not
recomputed here: a collector reads the cache's and the routing context's own accounting at scrape time.
"""

from __future__ import annotations

from collections import Counter

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, Info
from prometheus_client import Counter as PCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine=None, model: str = "", mode: str = "", version: str = ""):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PCounter(  # endpoint: a route's path, or "unmatched" for every path no route serves
            "sida_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "sida_request_duration_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        # Generation, as vLLM names it: every completion and chat choice, streamed or not, from its arrival
        self._generation_metrics(r)
        self.queue_wait_seconds = Histogram(
            "sida_queue_wait_seconds", "Accepted until its batch started", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("sida_queue_depth", "Accepted requests not yet started", registry=r)
        self.batch_size = Histogram("sida_batch_size", "Requests per batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "sida_batch_tokens", "Real input tokens per batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.tokens = PCounter("sida_tokens", "Tokens processed", ["kind"], registry=r)
        self.hash_build_seconds = Histogram(
            "sida_hash_build_seconds", "Time to build a batch's hash table", buckets=LATENCY_BUCKETS, registry=r
        )
        self.hash_queue_depth = Gauge("sida_hash_queue_depth", "Hashed batches waiting for inference", registry=r)
        by_stage = PCounter(
            "sida_batch_errors",
            "Batches that failed, by worker stage (predict: batch worker, infer: inference)",
            ["stage"],
            registry=r,
        )
        self.batch_errors = {stage: by_stage.labels(stage) for stage in ("predict", "infer")}
        self.stuck_steps = PCounter(
            "sida_stuck_steps", "Inference steps that ran past the watchdog's limit (server/watchdog.py)", registry=r
        )
        Info("sida_build", "Build information", registry=r).info({"version": version, "model": model, "mode": mode})
        if engine is not None:
            r.register(_EngineCollector(engine))

    def _generation_metrics(self, r: CollectorRegistry) -> None:
        """vLLM's names for what generation does: TTFT, TPOT, end-to-end latency, tokens, the running batch."""
        self.ttft = Histogram(
            "sida_time_to_first_token_seconds",
            "Accepted until the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "sida_time_per_output_token_seconds",
            "Mean time between a choice's generated tokens after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "sida_e2e_request_latency_seconds", "Accepted until the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = PCounter("sida_prompt_tokens", "Prompt tokens of generated choices", registry=r)
        self.generation_tokens = PCounter("sida_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("sida_num_requests_running", "Sequences in the running decode batch", registry=r)
        self.waiting = Gauge(
            "sida_num_requests_waiting",
            "Accepted sequences not yet running (queued or waiting for KV room)",
            registry=r,
        )
        self.kv_usage = Gauge(
            "sida_kv_cache_usage_ratio", "KV cache bytes reserved by running sequences / the KV bound", registry=r
        )

    def observe_batch(self, size: int, real_tokens: int) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(real_tokens)


class _EngineCollector:
    """Reads the offload engine's own accounting (device cache, routing context) when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        yield from self._hash_series()
        yield from self._cache_series()
        yield from self._memory_series()
        yield from self._movement_series()

    def _hash_series(self):
        stats = self.engine.routing_stats
        lookups = CounterMetricFamily("sida_hash_lookups", "Real tokens whose hash entry was checked", labels=["layer"])
        # dict(): one C-level copy of a counter the inference thread may add a key to while this iterates
        for layer, n in sorted(dict(stats.hash_lookups).items()):
            lookups.add_metric([str(layer)], n)
        yield lookups
        hits = CounterMetricFamily(
            "sida_hash_hits", "Real tokens whose router choice was among the top-k predictions", labels=["layer", "k"]
        )
        for (layer, k), n in sorted(dict(stats.hash_hits).items()):
            hits.add_metric([str(layer), str(k)], n)
        yield hits
        ahead_lookups = CounterMetricFamily(
            "sida_decode_lookahead_lookups",
            "Decode-step router choices checked against the layer-ahead guess",
            labels=["layer"],
        )
        ahead_hits = CounterMetricFamily(
            "sida_decode_lookahead_hits", "Decode-step router choices the layer-ahead guess had", labels=["layer"]
        )
        hits_by_layer = dict(stats.decode_hits)
        for layer, n in sorted(dict(stats.decode_lookups).items()):
            ahead_lookups.add_metric([str(layer)], n)
            ahead_hits.add_metric([str(layer)], hits_by_layer.get(layer, 0))
        yield from (ahead_lookups, ahead_hits)

    def _cache_series(self):
        e = self.engine
        cache_hits = CounterMetricFamily("sida_expert_cache_hits", "Expert lookups found resident", labels=["layer"])
        cache_misses = CounterMetricFamily(
            "sida_expert_cache_misses", "Expert lookups loaded on demand", labels=["layer"]
        )
        resident = GaugeMetricFamily("sida_resident_experts", "Experts resident on the device", labels=["layer"])
        cache = e.cache.stats if e.cache is not None else None
        per_layer = Counter(k[0] for k in e.cache.resident_keys) if e.cache is not None else None
        for layer in range(e.num_layers):
            if cache is not None:
                cache_hits.add_metric([str(layer)], cache.hits_by_layer[layer])
                cache_misses.add_metric([str(layer)], cache.misses_by_layer[layer])
                resident.add_metric([str(layer)], per_layer[layer])
            else:  # resident mode: every expert stays on the device
                resident.add_metric([str(layer)], e.num_experts)
        yield from (cache_hits, cache_misses, resident)

    def _memory_series(self):
        e = self.engine
        memory = GaugeMetricFamily(
            "sida_device_memory_bytes",
            "Device memory: placed by the engine (dense, experts) and, on CUDA, torch's allocated and reserved",
            labels=["kind"],
        )
        # what the engine placed: dense, experts, the continuous batch's KV bound (0 for static batches, whose cache
        # lives in the activation headroom)
        for kind, nbytes in sorted({"kv_cache": 0, **e.memory.by_kind}.items()):
            memory.add_metric([kind], nbytes)
        if e.device.type == "cuda":
            memory.add_metric(["allocated"], torch.cuda.memory_allocated(e.device))
            memory.add_metric(["reserved"], torch.cuda.memory_reserved(e.device))
        host = GaugeMetricFamily("sida_host_memory_bytes", "Host memory of the expert store", labels=["kind"])
        if e.cache is not None:
            host.add_metric(["experts"], e.cache.store.host_bytes)
            host.add_metric(["pinned"], e.cache.store.pinned_bytes + e.cache.transfer.staging_bytes)
        budget = GaugeMetricFamily("sida_expert_budget_bytes", "Device bytes reserved for experts")
        budget.add_metric([], e.num_slots * e.expert_bytes)
        slots = GaugeMetricFamily("sida_expert_slots", "Device slots for experts: the budget, in experts")
        slots.add_metric([], e.num_slots)
        yield from (memory, host, budget, slots)

    def _movement_series(self):
        e = self.engine
        cache = e.cache.stats if e.cache is not None else None
        prefetch = CounterMetricFamily(
            "sida_expert_prefetch_bytes",
            "Bytes of prefetched experts by outcome: used by a layer, or evicted (or failed) unused",
            labels=["outcome"],
        )
        prefetch.add_metric(["used"], sum(dict(cache.prefetch_used_bytes).values()) if cache else 0)
        prefetch.add_metric(["unused"], sum(dict(cache.prefetch_unused_bytes).values()) if cache else 0)
        yield prefetch
        counters = {
            "sida_expert_loads": ("Experts copied to the device", cache.loads if cache else 0),
            "sida_expert_evictions": ("Experts evicted from the device", cache.evictions if cache else 0),
            "sida_expert_bytes_transferred": ("Bytes of expert weights copied", cache.bytes_moved if cache else 0),
            "sida_expert_stall_seconds": ("Time compute waited for expert copies", cache.stall_seconds if cache else 0),
            "sida_expert_load_failures": ("Expert reads that failed", e.cache.transfer.failed_reads if cache else 0),
            "sida_expert_load_retries": (
                "Failed expert loads read again on demand",
                cache.load_retries if cache else 0,
            ),
            "sida_expert_repairs": ("Experts rewritten from the checkpoint after a checksum mismatch", e.repairs),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
