"""The compose stack's monitoring half on loopback, without Docker: Prometheus run from the shipped scrape config
and alert rules against a local `sida serve`, demo traffic, and the dashboard's and the rules' PromQL.

The ops tests and `render_dashboard.py` use it; Grafana itself is not run here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

DOCKER = Path(__file__).resolve().parent
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
ALERT_RULES = DOCKER / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "sida.json"
MODEL = "sida-switch-demo"
_COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard (panel title, legend) or of the alert rules (alert name)."""

    source: str
    legend: str
    expr: str


def dashboard_queries(rate_interval: str, path: Path = DASHBOARD) -> list[Query]:
    """Every panel target, with Grafana's `$__rate_interval` replaced by `rate_interval` (e.g. "1m")."""
    panels = json.loads(path.read_text())["panels"]
    return [
        Query(p["title"], t.get("legendFormat", ""), t["expr"].replace("$__rate_interval", rate_interval))
        for p in panels
        for t in p["targets"]
    ]


def alert_queries(path: Path = ALERT_RULES) -> list[Query]:
    """Every alert's expression with its comparisons made `bool` (`x > 0.05` → `x > bool 0.05`): a value for
    every series the rule reads, firing or not, so that a misspelt series or label shows as no data."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [
        Query(r["alert"], "", _COMPARISON.sub(r" \1 bool ", r["expr"]))
        for g in groups
        for r in g["rules"]
        if "alert" in r
    ]


def write_prometheus_config(out_dir: Path, target: str, interval_s: float) -> Path:
    """The shipped prometheus.yml with the scrape target replaced by `target` (host:port), both intervals set to
    `interval_s` and the rule file read from this folder; written into `out_dir`."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    interval = f"{interval_s:g}s"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(ALERT_RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    out = out_dir / "prometheus.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(config: Path, data_dir: Path, port: int, timeout_s: float = 60) -> subprocess.Popen:
    """Prometheus on 127.0.0.1:`port`; returns once it answers /-/ready (RuntimeError if it exits or stalls)."""
    cmd = [
        prometheus_binary() or "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"prometheus was not ready within {timeout_s} s")


def instant(prometheus: str, expr: str) -> list[dict]:
    """The result vector of an instant query (RuntimeError naming the expression if Prometheus refuses it)."""
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    r = httpx.get(
        f"{prometheus}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=30,
    )
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def wait_for_scrape(prometheus: str, after: float, timeout_s: float = 30) -> None:
    """Wait until Prometheus has a sample of the daemon scraped after the wall-clock time `after`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = instant(prometheus, 'timestamp(up{job="sida"})')  # a bare selector: the sample's own time
        if result and float(result[0]["value"][1]) > after:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no scrape of the daemon within {timeout_s} s")


def send_traffic(base: str, classify_calls: int = 4, completions: int = 2) -> None:
    """A little of everything the dashboard shows: batched classify calls, plain and streamed completions, and
    one refused request (400)."""
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(classify_calls):
            texts = [f"a gorgeous , witty movie number {i} .", "a dull mess .", "the plot is boilerplate ."]
            c.post("/v1/classify", json={"model": MODEL, "input": texts}).raise_for_status()
        for i in range(completions):
            body = {"model": MODEL, "prompt": f"the city council voted {i} times to", "max_tokens": 8}
            c.post("/v1/completions", json=body).raise_for_status()
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                r.raise_for_status()
                for _ in r.iter_lines():
                    pass
        bad = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
        if bad.status_code != 400:
            raise RuntimeError(f"a request with max_tokens 0 was answered {bad.status_code}, not 400: {bad.text}")
