"""Pass or fail of a load test run: the share of failed calls and the 95th-percentile latency of each kind of call
(and of a chat stream's time to first token and time per output token) against their limits; and those two
timings of one stream. Plain Python (no locust), so that the rules have unit tests.

Settings are "kind=value" lists, e.g. `sst2=4,mrpc=2,complete=2,stream=1`; a bare number sets every kind (every
limit, for `--sida-p95-ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("sst2", "mrpc", "complete", "stream", "chat")  # kinds of call: each has a weight and a p95 limit
TIMINGS = ("chat_ttft", "chat_tpot")  # per-call timings of `chat`: a p95 limit each, no weight, never a failure
# `chat` needs a model with a chat template (the Switch demo has none, the OLMoE demo has one): off unless asked for.
DEFAULT_WEIGHTS = {"sst2": 4.0, "mrpc": 2.0, "complete": 2.0, "stream": 1.0, "chat": 0.0}
# Limits for the demo models on a small CPU box with a few users; set tighter ones for a GPU server.
DEFAULT_P95_MS = {
    "sst2": 2000.0,
    "mrpc": 2000.0,
    "complete": 5000.0,
    "stream": 5000.0,
    "chat": 5000.0,
    "chat_ttft": 2000.0,
    "chat_tpot": 500.0,
}
DEFAULT_MAX_ERROR_RATIO = 0.01


def parse_kinds(text: str, defaults: dict[str, float], what: str) -> dict[str, float]:
    """`defaults` with the values `text` gives ("kind=value,..." or one number for every key of `defaults`);
    ValueError naming `what` for a kind `defaults` lacks, a value that is not a number, or a negative one."""
    values = dict(defaults)
    text = (text or "").strip()
    if not text:
        return values
    try:
        if "=" not in text:
            values = dict.fromkeys(defaults, float(text))
        else:
            for item in text.split(","):
                kind, _, value = item.partition("=")
                kind = kind.strip()
                if kind not in defaults:
                    raise ValueError(f"unknown kind {kind!r}")
                values[kind] = float(value)
    except ValueError as e:
        raise ValueError(f"{what}: {text!r} is not 'kind=number,...' over {list(defaults)} ({e})") from None
    if any(v < 0 for v in values.values()):
        raise ValueError(f"{what}: {text!r} has a negative value")
    return values


@dataclass(frozen=True)
class Entry:
    """What one kind of call (KINDS) or one timing (TIMINGS: one sample per call, never failed) did in a run."""

    kind: str
    requests: int
    failures: int
    p95_ms: float


def verdict(entries: list[Entry], max_error_ratio: float, p95_ms: dict[str, float]) -> list[str]:
    """Why the run failed, one line per reason; empty when it passed. A run without a single call fails. Only calls
    count towards the error ratio: a timing's samples are not calls of their own."""
    calls = [e for e in entries if e.kind in KINDS]
    requests = sum(e.requests for e in calls)
    failures = sum(e.failures for e in calls)
    if requests == 0:
        return ["no call was made"]
    reasons = []
    if failures / requests > max_error_ratio:
        reasons.append(f"{failures} of {requests} calls failed: ratio {failures / requests:.4f} > {max_error_ratio}")
    for e in entries:
        if e.requests and e.p95_ms > p95_ms[e.kind]:
            reasons.append(f"{e.kind}: p95 {e.p95_ms:.0f} ms > {p95_ms[e.kind]:.0f} ms")
    return reasons


def stream_timings(token_times: list[float] | None) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) of one stream, from the arrival times of its tokens counted from the call's start (None: the
    call failed), in their unit: the first token's time, and the mean gap between tokens after it,
    (last - first) / (tokens - 1), as the daemon's sida_time_per_output_token_seconds; None for either where
    the stream has too few tokens."""
    if not token_times:
        return None, None
    if len(token_times) < 2:
        return token_times[0], None
    return token_times[0], (token_times[-1] - token_times[0]) / (len(token_times) - 1)
