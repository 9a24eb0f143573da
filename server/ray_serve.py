"""`sida serve --replicas N`: the same app as a Ray Serve deployment of N replicas behind Ray's HTTP proxy.

Each replica rebuilds the typed `Settings` from the fields the driver resolved and runs `app_from_settings`, so it
has its own engine, pipeline and batching; Ray only routes. Only the CLI imports this module, and only when
`--replicas` is given: single-process `sida serve` never loads Ray.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve import metrics as serve_metrics

from sida.offload.device import resolve_device
from sida.server.app import app_from_settings
from sida.server.settings import Settings, load_settings

log = logging.getLogger("sida")

APP_NAME = "sida"
REPLICA_HEADER = "x-sida-replica"  # on every response: which replica answered (Ray's replica id)
METRICS_PERIOD_S = 5.0  # how often a replica copies its registry into Ray's metrics


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class MetricsBridge:
    """Copies a Prometheus registry's samples into Ray Serve gauges, which add the `deployment`, `replica` and
    `application` tags; Ray exports them (prefixed `ray_`) on each node's metrics port. Counters and histogram
    buckets keep their cumulative values, so `rate()` and `histogram_quantile()` still apply."""

    def __init__(self, registry: CollectorRegistry, gauge=serve_metrics.Gauge):
        self.registry = registry
        self.gauge = gauge
        self.gauges: dict[str, Any] = {}

    def publish(self) -> int:
        """Set one gauge per sample; returns how many samples were copied."""
        n = 0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created"):  # creation timestamps: not a measurement
                    continue
                g = self.gauges.get(s.name)
                if g is None:
                    g = self.gauges[s.name] = self.gauge(s.name, family.documentation, tuple(sorted(s.labels)))
                g.set(s.value, tags=dict(s.labels))
                n += 1
        return n

    def run(self, stop: threading.Event, period_s: float = METRICS_PERIOD_S) -> None:
        """Publish every `period_s` until `stop` is set."""
        while not stop.wait(period_s):
            try:
                self.publish()
            except Exception:  # a metrics hiccup must not end the replica; the next period tries again
                log.exception("copying metrics to Ray failed")


@serve.ingress()
class SidaReplica:
    """One replica: the app `sida serve` runs, built from the driver's settings, with its own engine."""

    def __init__(self, settings_fields: dict, hash_source: str):
        self.settings = Settings(**settings_fields)
        self.hash_source = hash_source
        self.replica = serve.get_replica_context().replica_tag
        self.stop_metrics = threading.Event()

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve after `__init__`; the app's lifespan (model load, warm-up) runs after this."""
        app = app_from_settings(self.settings, self.hash_source)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self.state = app.state.sida
        return app

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a failed worker makes Ray replace the replica. The metrics copier
        starts on the first healthy check (the registry exists once the lifespan's setup has run)."""
        if self.state.failure is not None:
            raise RuntimeError(f"worker failed: {self.state.failure}")
        if self.state.metrics is not None and not hasattr(self, "metrics_thread"):
            bridge = MetricsBridge(self.state.metrics.registry)
            self.metrics_thread = threading.Thread(target=bridge.run, args=(self.stop_metrics,), daemon=True)
            self.metrics_thread.start()

    def __del__(self):
        self.stop_metrics.set()


def replica_fields(settings: Settings) -> dict:
    """The settings fields a replica is rebuilt from: those set by file, env or flags (defaults stay defaults,
    so `mode_is_explicit` means the same in the replica). On CPU an unset `threads` becomes 1: each replica then
    uses the one core Ray reserves for it."""
    fields = settings.model_dump(exclude_unset=True)
    if settings.threads is None and resolve_device(settings.device).type == "cpu":
        fields["threads"] = 1
    return fields


def deployment(settings: Settings, replicas: int, hash_source: str = "auto"):
    """The bound application: `replicas` copies of the app; a CPU replica reserves `threads` cores, a CUDA one a
    GPU. Each replica takes up to `max_queue` calls at once (so its batches can fill) and Ray holds up to
    `max_queue` more per replica's worth before answering 503; a replica's own 429 reaches the client as is."""
    cuda = resolve_device(settings.device).type == "cuda"
    fields = replica_fields(settings)
    actor = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": fields["threads"] or 1}
    options = dict(
        num_replicas=replicas,
        ray_actor_options=actor,
        max_ongoing_requests=settings.max_queue,
        max_queued_requests=settings.max_queue * replicas,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        health_check_period_s=2.0,
        # a log line per call costs throughput: access lines only at log level debug, as sida's own
        logging_config={"log_level": settings.log_level.upper(), "enable_access_log": settings.log_level == "debug"},
    )
    return serve.deployment(SidaReplica, name=APP_NAME, **options).bind(fields, hash_source)


def build(args: dict):
    """The application builder for Ray's own config files (`serveConfigV2` in a KubeRay RayService, `serve run`):
    `args` are settings fields (and `config`: a YAML settings file), plus `replicas` and `hash`. The HTTP host and
    port are then the config's `http_options`."""
    args = dict(args)
    replicas, hash_source = int(args.pop("replicas", 1)), args.pop("hash", "auto")
    return deployment(load_settings(args.pop("config", None), **args), replicas, hash_source)


def start(settings: Settings, replicas: int, hash_source: str = "auto") -> None:
    """Ray Serve's proxy on `settings.host:port` and the deployment; returns once every replica is ready."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(settings, replicas, hash_source), name=APP_NAME, route_prefix="/")


def run(settings: Settings, replicas: int, hash_source: str = "auto", address: str | None = None) -> None:
    """`sida serve --replicas N`: join the Ray cluster at `address` (or RAY_ADDRESS; else start a local one),
    deploy, and serve until SIGTERM/SIGINT; then `serve.shutdown()` drains every replica and the process exits."""
    ray.init(address=address, include_dashboard=False, logging_level=settings.log_level.upper())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(settings, replicas, hash_source)
        log.info("sida ready: %d replicas behind http://%s:%d", replicas, settings.host, settings.port)
        stop.wait()
        log.info("draining: serve.shutdown() answers the accepted requests, then stops the replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
