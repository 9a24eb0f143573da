"""The dashboard and the alert rules against a real Prometheus: `sida serve` on the demo model and Prometheus on
loopback with the shipped scrape config (target and intervals rewritten) and rules, some traffic, then every
dashboard query and every alert expression through Prometheus's HTTP API."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port, start_serve

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "docker"))

import local_stack  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a live daemon and a live Prometheus
    pytest.mark.skipif(
        local_stack.prometheus_binary() is None,
        reason="prometheus not installed (Debian's `prometheus` package; `make prometheus` installs it as root)",
    ),
]
RATE_INTERVAL = "1m"  # every sample of the test fits in it; $__rate_interval in Grafana
ROUNDS, COMPLETIONS = 2, 2  # rounds of traffic; plain and as many streamed completions (one choice each) a round
DASHBOARD = local_stack.dashboard_queries(RATE_INTERVAL)
ALERTS = local_stack.alert_queries()


@pytest.fixture(scope="module")
def stack(demo_dir, tmp_path_factory):
    """(Prometheus URL, daemon URL, start time) after two rounds of traffic, each followed by a scrape, so that
    every counter has grown between two samples."""
    proc, base = start_serve(["--log-level", "warning"])  # exact mode, half of the experts: hash counters count
    tmp = tmp_path_factory.mktemp("prometheus")
    config = local_stack.write_prometheus_config(tmp, base.removeprefix("http://"), interval_s=1)
    prom = None
    try:
        port = free_port()
        prom = local_stack.start_prometheus(config, tmp / "data", port)
        url = f"http://127.0.0.1:{port}"
        start = time.time()
        for _ in range(ROUNDS):
            local_stack.wait_for_scrape(url, after=time.time())
            local_stack.send_traffic(base, completions=COMPLETIONS)
        local_stack.wait_for_scrape(url, after=time.time())
        yield url, base, start, config
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        proc.terminate()
        proc.wait(60)


def finite(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.parametrize("query", DASHBOARD, ids=[f"{q.source} | {q.legend}" for q in DASHBOARD])
def test_dashboard_query_returns_data(stack, query):
    result = local_stack.instant(stack[0], query.expr)
    assert result, f"no data for {query.expr}"
    assert finite(result), f"only NaN/Inf for {query.expr}: {result}"


@pytest.mark.parametrize("query", ALERTS, ids=[q.source for q in ALERTS])
def test_alert_expression_returns_data(stack, query):
    result = local_stack.instant(stack[0], query.expr)
    assert result, f"no data for {query.expr}"
    assert set(finite(result)) <= {0.0, 1.0}, result


def test_a_4xx_is_not_a_server_error(stack):
    (error_ratio,) = [q for q in ALERTS if q.source == "SidaHighErrorRatio"]
    assert finite(local_stack.instant(stack[0], error_ratio.expr)) == [0.0]


def test_rules_load_and_evaluate(stack):
    url = stack[0]
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, "rules not evaluated within 30 s"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {q.source for q in ALERTS}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    (target,) = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
    assert target["health"] == "up" and target["labels"]["job"] == "sida"


def test_hit_rates_are_ratios_for_every_layer(stack):
    url = stack[0]
    for title in ("Hash hit rate by layer (top-1)", "Expert cache hit rate"):
        (query, *_) = [q for q in DASHBOARD if q.source == title]
        values = finite(local_stack.instant(url, query.expr))
        assert len(values) == 4 and all(0 <= v <= 1 for v in values), (title, values)  # 2 encoder + 2 decoder


def test_every_completion_is_timed_once(stack):
    """Streamed or not, each completion choice is one time to first token and one end-to-end latency; one time per
    output token where it has two tokens or more; its tokens are counted."""
    url = stack[0]
    choices = ROUNDS * COMPLETIONS * 2
    for histogram in ("sida_time_to_first_token_seconds", "sida_e2e_request_latency_seconds"):
        assert finite(local_stack.instant(url, f"sum({histogram}_count)")) == [choices], histogram
    (tpot,) = finite(local_stack.instant(url, "sum(sida_time_per_output_token_seconds_count)"))
    assert 0 < tpot <= choices
    (generated,) = finite(local_stack.instant(url, "sum(sida_generation_tokens_total)"))
    (prompt,) = finite(local_stack.instant(url, "sum(sida_prompt_tokens_total)"))
    assert generated > 0 and prompt > 0
    (usage,) = finite(local_stack.instant(url, "max(sida_kv_cache_usage_ratio)"))
    assert 0 <= usage <= 1


def test_promtool_checks_config_and_rules_and_runs_the_rule_tests(stack):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian ships it with prometheus)")
    config = stack[3]
    for args in (
        ["check", "config", str(config)],
        ["check", "rules", str(local_stack.ALERT_RULES)],
        ["test", "rules", str(local_stack.DOCKER / "alerts.test.yml")],
    ):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_render_dashboard_draws_every_panel(stack, tmp_path):
    pytest.importorskip("matplotlib")
    import render_dashboard

    url, _, start, _ = stack
    out = render_dashboard.render(url, start, time.time(), tmp_path / "dashboard.png", RATE_INTERVAL, step=1)
    assert out.stat().st_size > 20_000
