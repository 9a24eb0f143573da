"""`sida serve --replicas N`: the same app as a Ray Serve deployment of N replicas behind Ray's HTTP proxy.

Each replica rebuilds the typed `Settings` from the fields the driver resolved and runs `app_from_settings`, so it
has its own engine, pipeline and batching; Ray only routes. `ProxyRetry` runs inside Ray's proxy (Ray imports this
module there, so its module-level imports stay light: no torch). Only the CLI imports this module, and only when
`--replicas` is given: single-process `sida serve` never loads Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import ray
from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve import metrics as serve_metrics
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sida.server.errors import APIError, envelope, unavailable

if TYPE_CHECKING:
    from sida.server.settings import Settings

log = logging.getLogger("sida")

APP_NAME = "sida"
REPLICA_HEADER = "x-sida-replica"  # on every response: which replica answered (Ray's replica id)
ATTEMPTS_HEADER = "x-sida-attempts"  # on an answer the proxy got on a later try (ProxyRetry): its number
METRICS_PERIOD_S = 5.0  # how often a replica copies its registry into Ray's metrics
# Ray's proxy wraps its ASGI app in the middlewares this function returns (read when a proxy starts).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = f"{__name__}.proxy_middlewares"
REPLAY_LIMIT = 1_000_000  # bytes of request body the proxy keeps to send a call again (the default max_body_bytes)
ATTEMPTS = 2  # a call whose replica died is sent once more, never a third time
# The proxy's deadline for a call, all attempts together: the replicas' own request_timeout_s (the same variable,
# which `start` gives Ray's proxies); unset, as on a KubeRay pod, it is that setting's default.
DEADLINE_ENV = "SIDA_REQUEST_TIMEOUT_S"
DEFAULT_DEADLINE_S = 60.0
# Ray's proxy cancels a call this long after the deadline, so that a replica's own 504 (or a stream's closing
# error event) normally reaches the client first.
DEADLINE_GRACE_S = 1.0
TIMEOUT_HEADER = b"x-request-timeout-seconds"  # Ray's per-call timeout: it cancels the replica call, answers 408


class Tape:
    """The client's `receive`, recorded so that a call can be sent to a replica again: each attempt's `receive`
    gives the messages already read, then reads on. Stops recording (no replay) past `limit` body bytes."""

    def __init__(self, receive: Receive, limit: int = REPLAY_LIMIT):
        self.source = receive
        self.limit = limit
        self.recorded: list[Message] = []
        self.size = 0
        self.replayable = True
        self.client_left = False

    def receive(self) -> Receive:
        replay = list(self.recorded)

        async def next_message() -> Message:
            if replay:
                return replay.pop(0)
            message = await self.source()
            if message["type"] == "http.disconnect":
                self.client_left = True
            elif self.replayable:
                self.size += len(message.get("body", b""))
                self.replayable = self.size <= self.limit
                if self.replayable:
                    self.recorded.append(message)
                else:
                    self.recorded.clear()
            return message

        return next_message


def timed_out(deadline_s: float) -> APIError:
    """The 504 a replica answers past its deadline (server/routes.py), answered by the proxy for its own."""
    return APIError(504, f"the request did not finish within {deadline_s} s", "timeout_error", code="deadline_exceeded")


class Attempt:
    """The `send` of one attempt: passes a replica's response on, and notes whether one started. Ray's own 503
    (its back-pressure or no-replica answer) and 408 (the call's timeout ran out), plain text with no replica
    header, are held and answered in the envelope: a 503 with Ray's text, a 504 naming the deadline."""

    def __init__(self, scope: Scope, send: Send, number: int = 1, deadline_s: float = DEFAULT_DEADLINE_S):
        self.scope = scope
        self.out = send
        self.number = number
        self.deadline_s = deadline_s
        self.started = False
        self.held_status = 0  # Ray's own 503 or 408, being replaced
        self.held: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            names = {name.lower() for name, _ in message.get("headers", [])}
            if message["status"] in (503, 408) and REPLICA_HEADER.encode() not in names:
                self.held_status = message["status"]
                return
            if self.number > 1:
                header = (ATTEMPTS_HEADER.encode(), str(self.number).encode())
                message = {**message, "headers": [*message.get("headers", []), header]}
        if not self.held_status:
            return await self.out(message)
        if message["type"] == "http.response.body":
            self.held.append(message.get("body", b""))
            if not message.get("more_body", False):
                text = b"".join(self.held).decode(errors="replace").strip() or "no replica can take the call"
                error = timed_out(self.deadline_s) if self.held_status == 408 else unavailable(text, "replicas_busy")
                await envelope(error)(self.scope, self.no_receive, self.out)

    @staticmethod
    async def no_receive() -> Message:
        return {"type": "http.disconnect"}


class ProxyRetry:
    """ASGI middleware inside Ray Serve's HTTP proxy. A call the proxy got no response for (its replica died
    holding it: Ray would answer a plain-text 500) is sent once more — Ray's router has dropped the dead replica
    by then, so it goes to another. Safe because every sida endpoint is side-effect free (inference, reads). A
    response that had started (a stream cut by the death) cannot be taken back: it ends where it broke. Ray's
    own endpoints (`/-/healthz`, `/-/routes`) pass through untouched.

    One deadline, `deadline_s` from the call's arrival here, bounds all attempts: each carries what is left of
    it (plus `grace_s`) as Ray's call timeout, and a call that timed out is never sent again, since its replica
    may still be computing it. The client then gets a 504 envelope. A call whose body was too long to keep gets
    a 503 envelope with Retry-After; one that stopped two replicas, a 500 that invites no third try."""

    def __init__(
        self,
        app: ASGIApp,
        replay_limit: int = REPLAY_LIMIT,
        deadline_s: float = DEFAULT_DEADLINE_S,
        grace_s: float = DEADLINE_GRACE_S,
    ):
        self.app = app
        self.replay_limit = replay_limit
        self.deadline_s = deadline_s
        self.grace_s = grace_s

    def headers(self, scope: Scope, deadline: float) -> list[tuple[bytes, bytes]]:
        """The call's headers with Ray's timeout set to the time left (a client's own value is dropped); a fresh
        list each time, as Ray's request-id middleware appends to it."""
        left = max(deadline - time.monotonic() + self.grace_s, 0.001)  # Ray reads 0 as no timeout at all
        kept = [(k, v) for k, v in scope["headers"] if k.lower() != TIMEOUT_HEADER]
        return [*kept, (TIMEOUT_HEADER, f"{left:.3f}".encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/-/"):
            return await self.app(scope, receive, send)
        tape = Tape(receive, self.replay_limit)
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(1, ATTEMPTS + 1):
            out = Attempt(scope, send, attempt, self.deadline_s)
            try:
                await self.app({**scope, "headers": self.headers(scope, deadline)}, tape.receive(), out.send)
            except (TimeoutError, asyncio.TimeoutError):
                if out.started:
                    raise
                return await envelope(timed_out(self.deadline_s))(scope, receive, send)
            except Exception:
                if out.started:
                    raise
                log.exception("Ray's proxy failed on %s (attempt %d)", scope["path"], attempt)
            if out.started or tape.client_left:
                return
            log.warning("no response for %s from its replica (attempt %d of %d)", scope["path"], attempt, ATTEMPTS)
            if not tape.replayable or time.monotonic() >= deadline:
                break
        await envelope(self.failure(attempt, deadline))(scope, receive, send)

    def failure(self, attempts: int, deadline: float) -> APIError:
        """The answer to a call no replica answered after `attempts` tries."""
        if attempts >= ATTEMPTS:
            message = "two replicas stopped while serving this call; it is not sent again (the input may be the cause)"
            return APIError(500, message, "server_error", code="replicas_failed")
        if time.monotonic() >= deadline:
            return timed_out(self.deadline_s)
        return unavailable("the replica serving this call stopped; retry", "replica_failed")


def proxy_deadline_s() -> float:
    """The proxy's deadline: DEADLINE_ENV, else the settings' default."""
    try:
        return float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S))
    except ValueError:
        return DEFAULT_DEADLINE_S


def proxy_env(settings: Settings) -> dict[str, str]:
    """The environment `start` gives Ray's proxies: the hook that installs `ProxyRetry`, and its deadline."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, DEADLINE_ENV: str(settings.request_timeout_s)}


def proxy_middlewares() -> list[Middleware]:
    """What Ray's HTTP proxy imports through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`PROXY_CALLBACK`)."""
    return [Middleware(ProxyRetry, deadline_s=proxy_deadline_s())]


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
        from sida.server.settings import Settings  # torch: kept out of Ray's proxy, which imports this module

        self.settings = Settings(**settings_fields)
        self.hash_source = hash_source
        self.replica = serve.get_replica_context().replica_tag
        self.stop_metrics = threading.Event()

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve after `__init__`; the app's lifespan (model load, warm-up) runs after this."""
        from sida.server.app import app_from_settings  # torch: kept out of Ray's proxy, which imports this module

        app = app_from_settings(self.settings, self.hash_source)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self.state = app.state.sida
        return app

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a failed worker or a fault (`State.fault`: a stuck step, an expert that
        cannot be repaired) makes Ray replace the replica. The metrics copier starts on the first healthy check (the
        registry exists once the lifespan's setup has run)."""
        if self.state.failure is not None:
            raise RuntimeError(f"worker failed: {self.state.failure}")
        if (fault := self.state.fault) is not None:
            raise RuntimeError(fault)
        if self.state.metrics is not None and not hasattr(self, "metrics_thread"):
            bridge = MetricsBridge(self.state.metrics.registry)
            self.metrics_thread = threading.Thread(target=bridge.run, args=(self.stop_metrics,), daemon=True)
            self.metrics_thread.start()

    def __del__(self):
        self.stop_metrics.set()


def replica_fields(settings: Settings) -> dict:
    """The settings fields a replica is rebuilt from: those set by file, env or flags (defaults stay defaults,
    so `mode_is_explicit` means the same in the replica). On CPU an unset `torch_threads` becomes 1: each replica then
    uses the one core Ray reserves for it."""
    from sida.offload.device import resolve_device  # torch: kept out of Ray's proxy, which imports this module

    fields = settings.model_dump(exclude_unset=True)
    if settings.torch_threads is None and resolve_device(settings.device).type == "cpu":
        fields["torch_threads"] = 1
    return fields


def deployment(settings: Settings, replicas: int, hash_source: str = "auto"):
    """The bound application: `replicas` copies of the app; a CPU replica reserves `torch_threads` cores, a CUDA one a
    GPU. Each replica takes up to `max_queue` calls at once (so its batches can fill) and Ray holds up to
    `max_queue` more per replica's worth before answering 503; a replica's own 429 reaches the client as is."""
    from sida.offload.device import resolve_device  # torch: kept out of Ray's proxy, which imports this module

    cuda = resolve_device(settings.device).type == "cuda"
    fields = replica_fields(settings)
    actor = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": fields["torch_threads"] or 1}
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
    from sida.server.settings import load_settings  # torch: kept out of Ray's proxy, which imports this module

    args = dict(args)
    replicas, hash_source = int(args.pop("replicas", 1)), args.pop("hash", "auto")
    return deployment(load_settings(args.pop("config", None), **args), replicas, hash_source)


def start(settings: Settings, replicas: int, hash_source: str = "auto") -> None:
    """Ray Serve's proxy on `settings.host:port` and the deployment; returns once every replica is ready. A Serve
    controller started here passes `proxy_env` to the proxies it starts, so they run `ProxyRetry`; on a
    cluster whose Serve already runs, the nodes need those variables themselves (docs/scale-out.md)."""
    http = {"host": settings.host, "port": settings.port}
    serve.start(http_options=http, controller_options={"runtime_env": {"env_vars": proxy_env(settings)}})
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
