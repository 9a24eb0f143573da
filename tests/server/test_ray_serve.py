"""`sida serve --replicas N` (server/ray_serve.py): two replicas of the demo model on a local one-node Ray cluster
on loopback; requests spread over both, answers match a single-process runner, Ray's metrics port exports each
replica's sida series, a killed replica is replaced and the calls it held are answered (retried) or get a 503
envelope; `ProxyRetry` on a fake proxy app (its deadline: test_ray_proxy_deadline.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'sida[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sida[ray]')")
pytestmark = pytest.mark.slow  # a local Ray cluster

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sida.offload.model_loader import load_model  # noqa: E402
from sida.offload.runner import Runner  # noqa: E402
from sida.server import ray_serve  # noqa: E402
from sida.server.settings import load_settings  # noqa: E402
from tests.live_server import free_port  # noqa: E402

MODEL = "sida-switch-demo"
TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "it's a charming and often affecting journey .",
    "a dull , lifeless and tedious film .",
    "one of the best films of the year .",
    "i wanted my two hours back .",
] * 4
WAIT_S = 60  # bound on every wait for the cluster
CLASSIFY = {"endpoint": "/v1/classify", "status": "200"}  # the sida_requests_total series the metrics test reads


class Cluster(NamedTuple):
    base: str  # the HTTP entry (Ray's proxy)
    metrics: str  # Ray's Prometheus export on this node


@pytest.fixture(scope="module")
def cluster(demo_dir):
    """A one-node Ray cluster on loopback with the demo model deployed as two replicas, exporting metrics on a
    known port every second (Ray's default is 10 s); stopped at the end."""
    port, metrics_port = free_port(), free_port()
    settings = load_settings(
        None,
        model_dir=demo_dir,
        max_batch_size=4,
        torch_threads=1,
        port=port,
        log_level="warning",
        max_batch_wait_ms=20,
    )
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        ray_serve.start(settings, replicas=2)
        yield Cluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


def classify_all(base: str, texts: list[str], clients: int = 6) -> list[httpx.Response | Exception]:
    """Each text as its own call, `clients` at a time; a call that fails or times out comes back as its error."""

    async def run():
        gate = asyncio.Semaphore(clients)
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:

            async def one(text):
                async with gate:
                    try:
                        return await c.post("/v1/classify", json={"model": MODEL, "input": text})
                    except httpx.HTTPError as e:
                        return e

            return await asyncio.gather(*(one(t) for t in texts))

    return asyncio.run(run())


def running_replicas() -> list[str]:
    """Names of the deployment's replica actors (in Ray's `serve` namespace)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in actors if a["name"].startswith(f"SERVE_REPLICA::{ray_serve.APP_NAME}#")]


def test_calls_spread_over_both_replicas_with_the_runners_answers(cluster, demo_dir):
    responses = classify_all(cluster.base, TEXTS)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert len({r.headers[ray_serve.REPLICA_HEADER] for r in responses}) == 2
    expected = [c.label for c in Runner(load_model(demo_dir)).classify(TEXTS)]
    assert [r.json()["data"][0]["label"] for r in responses] == expected
    ready = httpx.get(cluster.base + "/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.headers[ray_serve.REPLICA_HEADER]


def exported(url: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of each sample called `name` on Ray's metrics export (none while it is not up yet)."""
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return []
    families = text_string_to_metric_families(text)
    return [(s.labels, s.value) for f in families for s in f.samples if s.name == name]


def test_rays_metrics_port_exports_each_replicas_series_with_its_count(cluster):
    """The real export (not a fake gauge): `ray_sida_*` series labelled with both replicas' ids, and one
    replica's classify count there equal to its own /metrics once traffic stops (the bridge copies every 5 s,
    Ray exports every second here)."""
    replicas = {r.headers[ray_serve.REPLICA_HEADER] for r in classify_all(cluster.base, TEXTS)}
    assert len(replicas) == 2
    deadline = time.monotonic() + WAIT_S
    seen: set = set()
    while time.monotonic() < deadline:
        own = httpx.get(cluster.base + "/metrics", timeout=10)  # whichever replica Ray routes to: its registry
        mine = [
            s.value
            for f in text_string_to_metric_families(own.text)
            for s in f.samples
            if s.name == "sida_requests_total" and s.labels == CLASSIFY
        ]
        samples = exported(cluster.metrics, "ray_sida_requests_total")
        seen = {labels.get("replica") for labels, _ in samples}
        replica = own.headers[ray_serve.REPLICA_HEADER]
        copied = [v for labels, v in samples if labels.get("replica") == replica and CLASSIFY.items() <= labels.items()]
        if replicas <= seen and mine and copied == mine:
            assert {"deployment", "application"} <= set(samples[0][0])
            print(f"\nray_sida_requests_total: replicas {sorted(seen)}; {replica} classify 200 = {copied[0]:g}")
            return
        time.sleep(1)
    pytest.fail(f"Ray's export never showed both replicas' counts: replicas {seen}, want {replicas}")


def test_a_killed_replica_is_replaced_and_no_call_hangs(cluster):
    before = running_replicas()
    assert len(before) == 2
    results: list = []
    calls = TEXTS * 6
    traffic = threading.Thread(target=lambda: results.extend(classify_all(cluster.base, calls, clients=4)))
    traffic.start()
    time.sleep(0.3)  # calls in flight on both replicas
    assert traffic.is_alive()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    traffic.join(WAIT_S)
    assert not traffic.is_alive(), "calls still unanswered"
    assert len(results) == len(calls)
    # Calls inside the killed replica are sent again by ProxyRetry (to the survivor) or get a 503 envelope; never
    # Ray's plain-text 500, and none waits for its client's timeout.
    assert all(isinstance(r, httpx.Response) for r in results), [
        r for r in results if not isinstance(r, httpx.Response)
    ]
    refused = [r for r in results if r.status_code != 200]
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.status_code, r.headers, r.text)
        assert json.loads(r.text)["error"]["type"] == "service_unavailable", r.text
    retried = [r for r in results if r.status_code == 200 and ray_serve.ATTEMPTS_HEADER in r.headers]
    print(
        f"\nkill mid-run: {len(calls)} calls, {len(results) - len(refused)} x 200 ({len(retried)} on a 2nd try), "
        f"{len(refused)} x 503 envelope"
    )
    assert len(refused) <= 4, refused  # at most the calls in flight (4 clients)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = running_replicas()
        if len(now) == 2 and before[0] not in now:
            status = serve.status().applications[ray_serve.APP_NAME].deployments[ray_serve.APP_NAME]
            if status.replica_states.get("RUNNING") == 2:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement replica within {WAIT_S} s: {running_replicas()}")
    after = classify_all(cluster.base, TEXTS)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in after)
    assert len({r.headers[ray_serve.REPLICA_HEADER] for r in after}) == 2


def test_the_metrics_bridge_copies_every_sample_with_its_labels():
    registry = CollectorRegistry()
    Counter("sida_requests", "calls", ["endpoint", "status"], registry=registry).labels("/v1/classify", "200").inc(3)
    Histogram("sida_batch_size", "sizes", buckets=(1, 4), registry=registry).observe(2)
    made: dict = {}

    class FakeGauge:
        def __init__(self, name, description, tag_keys):
            self.values = made[name] = {}
            self.tag_keys = tag_keys

        def set(self, value, tags):
            assert tuple(sorted(tags)) == self.tag_keys
            self.values[tuple(sorted(tags.items()))] = value

    ray_serve.MetricsBridge(registry, FakeGauge).publish()
    assert made["sida_requests_total"] == {(("endpoint", "/v1/classify"), ("status", "200")): 3}
    assert made["sida_batch_size_bucket"][(("le", "4.0"),)] == 1 and made["sida_batch_size_count"][()] == 1
    assert not any(name.endswith("_created") for name in made)


def through_proxy_retry(behaviours: list[str], body: bytes = b'{"input": "x"}') -> tuple[list[dict], list[bytes]]:
    """One call through `ProxyRetry` around a fake proxy app that, per attempt, answers 200 as a replica
    ("replica"), sends nothing as Ray's proxy does when the replica dies ("died") or answers Ray's plain-text 503
    ("ray_503"). Returns the messages the client got and the body each attempt read."""
    bodies: list[bytes] = []

    async def proxy_app(scope, receive, send):
        bodies.append((await receive())["body"])
        kind = behaviours[len(bodies) - 1]
        if kind == "died":
            return
        header = [(ray_serve.REPLICA_HEADER.encode(), b"sida#a")] if kind == "replica" else []
        await send({"type": "http.response.start", "status": 200 if header else 503, "headers": header})
        await send({"type": "http.response.body", "body": b"ok" if header else b"Request dropped due to backpressure"})

    async def call():
        sent: list[dict] = []
        inbox = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return inbox.pop() if inbox else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
        await ray_serve.ProxyRetry(proxy_app)(scope, receive, send)
        return sent

    return asyncio.run(call()), bodies


def test_proxy_retry_sends_a_call_whose_replica_died_again_then_answers_an_envelope():
    sent, bodies = through_proxy_retry(["died", "replica"])
    assert bodies == [b'{"input": "x"}'] * 2  # the body replayed to the second attempt
    assert sent[0]["status"] == 200 and (ray_serve.ATTEMPTS_HEADER.encode(), b"2") in sent[0]["headers"]
    assert sent[1]["body"] == b"ok"
    sent, bodies = through_proxy_retry(["died", "died"])  # two replicas down: no Retry-After invites a third
    assert len(bodies) == 2 and sent[0]["status"] == 500 and b"retry-after" not in dict(sent[0]["headers"])
    assert json.loads(sent[1]["body"])["error"]["code"] == "replicas_failed"
    sent, bodies = through_proxy_retry(["died"], body=b"x" * (ray_serve.REPLAY_LIMIT + 1))
    assert len(bodies) == 1 and sent[0]["status"] == 503  # too long to keep: not sent again
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_failed"


def test_proxy_retry_answers_rays_own_503_in_the_envelope():
    sent, bodies = through_proxy_retry(["ray_503"])
    assert len(bodies) == 1 and sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"1"
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "service_unavailable" and error["message"] == "Request dropped due to backpressure"


def test_plain_sida_serve_never_imports_ray():
    code = "import sys, sida.server.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_kuberay_manifest_is_a_valid_serve_config_that_builds_sida(demo_dir):
    """docker/ray/rayservice.yaml cannot be applied here (no Kubernetes): its serveConfigV2 is checked against
    Ray's own schema, its application built from its args (the model path and device swapped for this box), and
    every pod's environment names the ProxyRetry hook."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((Path(__file__).parents[2] / "docker" / "ray" / "rayservice.yaml").read_text())
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == f"{ray_serve.__name__}:{ray_serve.build.__name__}"
    application = ray_serve.build({**app["args"], "model_dir": str(demo_dir), "device": "cpu"})
    assert isinstance(application, serve.Application)
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    envs = [{e["name"]: e["value"] for e in c["env"]} for g in groups for c in g["template"]["spec"]["containers"]]
    assert envs and all(env.get(ray_serve.PROXY_CALLBACK_ENV) == ray_serve.PROXY_CALLBACK for env in envs)


def test_a_fault_fails_rays_health_check_so_that_the_replica_is_replaced():
    """A stuck step or an expert that cannot be repaired (`State.fault`) is a failed health check."""
    replica = SimpleNamespace()  # the method's `self`: an ingress instance's destructor needs a running replica
    replica.state = SimpleNamespace(
        failure=None, fault="the inference decode step has run 70 s (limit 60 s)", metrics=None
    )
    with pytest.raises(RuntimeError, match="decode step has run 70 s"):
        ray_serve.SidaReplica.check_health(replica)
    replica.state.fault = None
    ray_serve.SidaReplica.check_health(replica)
