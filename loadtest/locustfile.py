"""Locust load test of sida's HTTP API: classification of SST-2 sentences and MRPC sentence pairs (`task`),
completions and streamed completions of WikiText sentence beginnings, and (asked for with `--sida-weights chat=1`,
for a model with a chat template) streamed chat completions with those beginnings as the user's message, mixed by
weight; the run passes or fails on its share of failed calls, each kind's 95th-percentile latency, and a chat
stream's 95th-percentile time to first token and time per output token, which set locust's exit code.

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
    TIMINGS,
    Entry,
    parse_kinds,
    stream_timings,
    verdict,
)

log = logging.getLogger("loadtest")
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # ../shared/data beside the repo
NAMES = {  # the locust stats entry of each kind
    "sst2": "/v1/classify [sst2]",
    "mrpc": "/v1/classify [mrpc]",
    "complete": "/v1/completions",
    "stream": "/v1/completions [stream]",
    "chat": "/v1/chat/completions [stream]",
    # a chat stream's timings, one sample per call: to its first content delta, and per token after it
    "chat_ttft": "/v1/chat/completions [stream, TTFT]",
    "chat_tpot": "/v1/chat/completions [stream, TPOT]",
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
    for kind in Plan.kinds + [t for t in TIMINGS if "chat" in Plan.kinds]:
        s = environment.stats.get(NAMES[kind], "POST")
        entries.append(Entry(kind, s.num_requests, s.num_failures, s.get_response_time_percentile(0.95) or 0))
    for e in entries:
        what = "calls" if e.kind in KINDS else "samples"  # a timing: one sample per chat call
        limit = Plan.p95_ms[e.kind]
        log.info(
            "%-9s %6d %-7s %4d failed  p95 %6.0f ms (limit %.0f)", e.kind, e.requests, what, e.failures, e.p95_ms, limit
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
        elif kind == "stream":
            self.stream()
        else:
            self.chat()

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

    def sampling(self) -> dict:
        """Sampled (temperature 0.7, top-p 0.9) with a repetition penalty and a seed."""
        return {
            "model": Plan.model,
            "max_tokens": Plan.max_tokens,
            "temperature": 0.7,
            "top_p": 0.9,
            "repetition_penalty": 1.3,
            "seed": self.rng.randrange(2**31),
        }

    def completion_body(self) -> dict:
        """A WikiText prompt, sampled."""
        return {**self.sampling(), "prompt": self.rng.choice(Plan.inputs.prompts)}

    def complete(self) -> None:
        with self.client.post("/v1/completions", json=self.completion_body(), catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                r.failure("no finish_reason")

    def stream(self) -> None:
        """A streamed completion, timed to `[DONE]`; the time to its first text is a stats entry of its own."""
        body = {**self.completion_body(), "stream": True}
        token_ms = self.read_stream("/v1/completions", NAMES["stream"], body, _text_of)
        if token_ms:
            self.fire(FIRST_TOKEN, token_ms[0])

    def chat(self) -> None:
        """A streamed chat completion of one user message (a WikiText beginning), timed to `[DONE]`; its time to
        the first content delta and its time per output token (one content delta a token) are entries of their own."""
        message = {"role": "user", "content": self.rng.choice(Plan.inputs.prompts)}
        body = {**self.sampling(), "messages": [message], "stream": True}
        ttft, tpot = stream_timings(self.read_stream("/v1/chat/completions", NAMES["chat"], body, _content_of))
        if ttft is not None:
            self.fire(NAMES["chat_ttft"], ttft)
        if tpot is not None:
            self.fire(NAMES["chat_tpot"], tpot)

    def read_stream(self, path: str, name: str, body: dict, text_of) -> list[float] | None:
        """POST a streamed call, timed to `[DONE]` as the stats entry `name`; the times (ms from the start) of its
        events with text (`text_of` a `data: {chunk}` line), or None when the call failed."""
        url = self.host.rstrip("/") + path
        t0, token_ms, lines = time.perf_counter(), [], []
        with self.environment.events.request.measure("POST", name) as meta:
            with self.streams.post(url, json=body, stream=True, timeout=60) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: "):
                        continue
                    lines.append(line)
                    if line != DONE and not line.startswith('data: {"error"') and text_of(line):
                        token_ms.append((time.perf_counter() - t0) * 1000)
            meta["response_length"] = sum(len(line) for line in lines)
            if lines[-1:] != [DONE] or any(line.startswith('data: {"error"') for line in lines):
                raise RuntimeError(f"a broken stream: {lines[-2:]}")
        return token_ms if meta["exception"] is None else None

    def fire(self, name: str, ms: float) -> None:
        """A timing of a call that succeeded, as a stats entry of its own (never a failure)."""
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=ms, response_length=0, exception=None, context={}
        )


def _text_of(line: str) -> str:
    """The text of a completion's `data: {chunk}` line's first choice."""
    return json.loads(line.removeprefix("data: "))["choices"][0]["text"]


def _content_of(line: str) -> str:
    """The content of a chat `data: {chunk}` line's first choice's delta ("" for the role-only first chunk and the
    one that carries `finish_reason`)."""
    choices = json.loads(line.removeprefix("data: "))["choices"]
    if not choices:  # a chunk without a choice (usage only) carries no token
        return ""
    return choices[0].get("delta", {}).get("content") or ""
