"""Locust load test of sida's HTTP API: classification of SST-2 sentences and MRPC sentence pairs (`task`),
completions and streamed completions of WikiText sentence beginnings, mixed by weight; the run passes or fails
on its share of failed calls and each kind's 95th-percentile latency, which set locust's exit code.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 4 --run-time 60s \\
        --csv runs/loadtest/sida --html runs/loadtest/report.html

`loadtest/run.py` (`make loadtest`) starts `sida serve` on loopback and runs this. Every `--sida-*` option can
also be set by its environment variable (`locust --help` lists them); loadtest/README.md has the details.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import requests
from inputs import Inputs, read_inputs
from locust import HttpUser, between, events
from locust import task as locust_task
from thresholds import (
    DEFAULT_MAX_ERROR_RATIO,
    DEFAULT_P95_MS,
    DEFAULT_WEIGHTS,
    KINDS,
    Entry,
    parse_kinds,
    verdict,
)

log = logging.getLogger("loadtest")
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # ../shared/data beside the repo
NAMES = {  # the locust stats entry of each kind
    "sst2": "/v1/classify [sst2]",
    "mrpc": "/v1/classify [mrpc]",
    "complete": "/v1/completions",
    "stream": "/v1/completions [stream]",
}
FIRST_TOKEN = "/v1/completions [stream, first token]"
DONE = "data: [DONE]"


class Plan:
    """What the users share, set once from the options at start-up."""

    inputs: Inputs
    kinds: list[str]
    weights: list[float]
    p95_ms: dict[str, float]
    max_error_ratio: float
    max_tokens: int
    headers: dict[str, str] = {}
    model: str = ""


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--sida-data", env_var="SIDA_LOADTEST_DATA", default=str(DATA), help="shared data folder")
    parser.add_argument("--sida-model", env_var="SIDA_LOADTEST_MODEL", default="", help="model (default: served)")
    parser.add_argument("--sida-api-key", env_var="SIDA_LOADTEST_API_KEY", default="", is_secret=True)
    weights = ",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items())
    parser.add_argument("--sida-weights", env_var="SIDA_LOADTEST_WEIGHTS", default=weights, help="call mix")
    p95 = ",".join(f"{k}={v:g}" for k, v in DEFAULT_P95_MS.items())
    parser.add_argument("--sida-p95-ms", env_var="SIDA_LOADTEST_P95_MS", default=p95, help="p95 limits (ms)")
    parser.add_argument(
        "--sida-max-error-ratio", env_var="SIDA_LOADTEST_MAX_ERROR_RATIO", type=float, default=DEFAULT_MAX_ERROR_RATIO
    )
    parser.add_argument("--sida-max-tokens", env_var="SIDA_LOADTEST_MAX_TOKENS", type=int, default=16)


@events.init.add_listener
def _plan(environment, **_kwargs) -> None:
    """Read the data and the settings once; a bad one stops locust with one line."""
    o = environment.parsed_options
    if o is None:  # locust used as a library: no options
        return
    try:
        weights = parse_kinds(o.sida_weights, DEFAULT_WEIGHTS, "--sida-weights")
        Plan.p95_ms = parse_kinds(o.sida_p95_ms, DEFAULT_P95_MS, "--sida-p95-ms")
        Plan.inputs = read_inputs(Path(o.sida_data))
    except (ValueError, OSError) as e:
        raise SystemExit(f"loadtest: {e}") from None
    Plan.kinds = [k for k in KINDS if weights[k] > 0]
    if not Plan.kinds:
        raise SystemExit("loadtest: --sida-weights gives every kind of call weight 0")
    Plan.weights = [weights[k] for k in Plan.kinds]
    Plan.max_error_ratio, Plan.max_tokens, Plan.model = o.sida_max_error_ratio, o.sida_max_tokens, o.sida_model
    Plan.headers = {"Authorization": f"Bearer {o.sida_api_key}"} if o.sida_api_key else {}


@events.quitting.add_listener
def _verdict(environment, **_kwargs) -> None:
    """Pass or fail by the thresholds: this sets locust's exit code (0 or 1)."""
    if environment.parsed_options is None or not hasattr(Plan, "kinds"):
        return
    entries = []
    for kind in Plan.kinds:
        s = environment.stats.get(NAMES[kind], "POST")
        entries.append(Entry(kind, s.num_requests, s.num_failures, s.get_response_time_percentile(0.95) or 0))
    for e in entries:
        limit = Plan.p95_ms[e.kind]
        log.info(
            "%-8s %6d calls %4d failed  p95 %6.0f ms (limit %.0f)", e.kind, e.requests, e.failures, e.p95_ms, limit
        )
    reasons = verdict(entries, Plan.max_error_ratio, Plan.p95_ms)
    for reason in reasons:
        log.error("loadtest failed: %s", reason)
    if not reasons:
        log.info("loadtest passed: error ratio <= %s and every p95 within its limit", Plan.max_error_ratio)
    environment.process_exit_code = 1 if reasons else 0


class SidaUser(HttpUser):
    """A client that sends a mix of calls, one at a time, with a short pause between them."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.client.headers.update(Plan.headers)
        self.streams = requests.Session()  # streamed calls are timed by hand, to their last event
        self.streams.headers.update(Plan.headers)
        if not Plan.model:
            Plan.model = self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]

    def on_stop(self) -> None:
        self.streams.close()

    @locust_task
    def call(self) -> None:
        kind = self.rng.choices(Plan.kinds, Plan.weights)[0]
        if kind in ("sst2", "mrpc"):
            self.classify(kind)
        elif kind == "complete":
            self.complete()
        else:
            self.stream()

    def classify(self, task: str) -> None:
        """1 to 4 inputs of the task in one call."""
        pool = Plan.inputs.sentences if task == "sst2" else Plan.inputs.pairs
        inputs = [x if isinstance(x, str) else list(x) for x in self.rng.sample(pool, self.rng.randint(1, 4))]
        body = {"model": Plan.model, "task": task, "input": inputs}
        with self.client.post("/v1/classify", json=body, name=NAMES[task], catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif [d["index"] for d in r.json()["data"]] != list(range(len(inputs))):
                r.failure("not one label per input, in order")

    def completion_body(self) -> dict:
        """A WikiText prompt, sampled (temperature 0.7, top-p 0.9) with a repetition penalty and a seed."""
        return {
            "model": Plan.model,
            "prompt": self.rng.choice(Plan.inputs.prompts),
            "max_tokens": Plan.max_tokens,
            "temperature": 0.7,
            "top_p": 0.9,
            "repetition_penalty": 1.3,
            "seed": self.rng.randrange(2**31),
        }

    def complete(self) -> None:
        with self.client.post("/v1/completions", json=self.completion_body(), catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                r.failure("no finish_reason")

    def stream(self) -> None:
        """A streamed completion, timed to `[DONE]`; the time to its first text is a stats entry of its own."""
        url = self.host.rstrip("/") + "/v1/completions"
        t0, first_ms, lines = time.perf_counter(), None, []
        with self.environment.events.request.measure("POST", NAMES["stream"]) as meta:
            with self.streams.post(url, json={**self.completion_body(), "stream": True}, stream=True, timeout=60) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: "):
                        continue
                    lines.append(line)
                    if first_ms is None and line != DONE and _text_of(line):
                        first_ms = (time.perf_counter() - t0) * 1000
            meta["response_length"] = sum(len(line) for line in lines)
            if lines[-1:] != [DONE] or any(line.startswith('data: {"error"') for line in lines):
                raise RuntimeError(f"a broken stream: {lines[-2:]}")
        if meta["exception"] is None and first_ms is not None:
            self.environment.events.request.fire(
                request_type="POST",
                name=FIRST_TOKEN,
                response_time=first_ms,
                response_length=0,
                exception=None,
                context={},
            )


def _text_of(line: str) -> str:
    """The text of a `data: {chunk}` line's first choice."""
    return json.loads(line.removeprefix("data: "))["choices"][0]["text"]
