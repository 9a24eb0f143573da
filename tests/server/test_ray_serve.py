"""`sida serve --replicas N` (server/ray_serve.py): two replicas of the demo model on a local one-node Ray cluster
on loopback; requests spread over both, answers match a single-process runner, a killed replica is replaced."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'sida[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sida[ray]')")
pytestmark = pytest.mark.slow  # a local Ray cluster

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402

from sida.offload.model_loader import load_model  # noqa: E402
from sida.offload.runner import Runner  # noqa: E402
from sida.server import ray_serve  # noqa: E402
from sida.server.settings import load_settings  # noqa: E402
from sida.server.subprocess_server import free_port  # noqa: E402

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


@pytest.fixture(scope="module")
def cluster(demo_dir):
    """A one-node Ray cluster on loopback with the demo model deployed as two replicas; stopped at the end."""
    port = free_port()
    settings = load_settings(
        None, model_dir=demo_dir, max_batch_size=4, threads=1, port=port, log_level="warning", max_batch_wait_ms=20
    )
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        ray_serve.start(settings, replicas=2)
        yield f"http://127.0.0.1:{port}"
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
    responses = classify_all(cluster, TEXTS)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert len({r.headers[ray_serve.REPLICA_HEADER] for r in responses}) == 2
    expected = [c.label for c in Runner(load_model(demo_dir)).classify(TEXTS)]
    assert [r.json()["data"][0]["label"] for r in responses] == expected
    ready = httpx.get(cluster + "/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.headers[ray_serve.REPLICA_HEADER]


def test_a_killed_replica_is_replaced_and_no_call_hangs(cluster):
    before = running_replicas()
    assert len(before) == 2
    results: list = []
    calls = TEXTS * 6
    traffic = threading.Thread(target=lambda: results.extend(classify_all(cluster, calls, clients=4)))
    traffic.start()
    time.sleep(0.3)  # calls in flight on both replicas
    assert traffic.is_alive()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    traffic.join(WAIT_S)
    assert not traffic.is_alive(), "calls still unanswered"
    assert len(results) == len(calls)
    # Calls inside the killed replica get Ray's proxy's 500 (its process died holding them); every other call is
    # answered by the surviving replica. None waits for its client's timeout.
    failed = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert len(failed) <= 4, failed  # at most the calls in flight (4 clients)
    assert all(isinstance(r, httpx.Response) and r.status_code in (500, 503) for r in failed), failed
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
    after = classify_all(cluster, TEXTS)
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


def test_plain_sida_serve_never_imports_ray():
    code = "import sys, sida.server.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
