"""Pass or fail of a load test run: the share of failed calls and the 95th-percentile latency of each kind of call
against their limits. Plain Python (no locust), so that the rules have unit tests.

Settings are "kind=value" lists, e.g. `sst2=4,mrpc=2,complete=2,stream=1`; a bare number sets every kind.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("sst2", "mrpc", "complete", "stream")
DEFAULT_WEIGHTS = {"sst2": 4.0, "mrpc": 2.0, "complete": 2.0, "stream": 1.0}
# Limits for the demo model on a small CPU box with a few users; set tighter ones for a GPU server.
DEFAULT_P95_MS = {"sst2": 2000.0, "mrpc": 2000.0, "complete": 5000.0, "stream": 5000.0}
DEFAULT_MAX_ERROR_RATIO = 0.01


def parse_kinds(text: str, defaults: dict[str, float], what: str) -> dict[str, float]:
    """`defaults` with the values `text` gives ("kind=value,..." or one number for every kind); ValueError
    naming `what` for an unknown kind, a value that is not a number, or a negative one."""
    values = dict(defaults)
    text = (text or "").strip()
    if not text:
        return values
    try:
        if "=" not in text:
            values = dict.fromkeys(KINDS, float(text))
        else:
            for item in text.split(","):
                kind, _, value = item.partition("=")
                kind = kind.strip()
                if kind not in KINDS:
                    raise ValueError(f"unknown kind {kind!r}")
                values[kind] = float(value)
    except ValueError as e:
        raise ValueError(f"{what}: {text!r} is not 'kind=number,...' over {list(KINDS)} ({e})") from None
    if any(v < 0 for v in values.values()):
        raise ValueError(f"{what}: {text!r} has a negative value")
    return values


@dataclass(frozen=True)
class Entry:
    """What one kind of call did in a run."""

    kind: str
    requests: int
    failures: int
    p95_ms: float


def verdict(entries: list[Entry], max_error_ratio: float, p95_ms: dict[str, float]) -> list[str]:
    """Why the run failed, one line per reason; empty when it passed. A run without a single call fails."""
    requests = sum(e.requests for e in entries)
    failures = sum(e.failures for e in entries)
    if requests == 0:
        return ["no call was made"]
    reasons = []
    if failures / requests > max_error_ratio:
        reasons.append(f"{failures} of {requests} calls failed: ratio {failures / requests:.4f} > {max_error_ratio}")
    for e in entries:
        if e.requests and e.p95_ms > p95_ms[e.kind]:
            reasons.append(f"{e.kind}: p95 {e.p95_ms:.0f} ms > {p95_ms[e.kind]:.0f} ms")
    return reasons
