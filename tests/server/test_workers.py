"""The two workers driven step by step with a fake runner and a fake clock: no threads, no model."""

import asyncio

import pytest

from sida.offload.tasks import get_task
from sida.server.batcher import Batcher
from sida.server.metrics import Metrics
from sida.server.request import DeadlineExceeded, Request
from sida.server.workers import BatchWorker, HashedBatch, InferenceWorker
from tests.server import fakes

TASK = get_task("sst2")


class FakeRunner(fakes.FakeRunner):
    """The fake runner, recording the first token of each row it built a table for and what each classification
    was given; call number `fail_on_call` fails."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[dict] = []
        self.hashed: list[list[int]] = []
        self.fail_on_call = fail_on_call

    def build_hash_table(self, enc, decoder_input_ids=None):
        self.hashed.append(enc["input_ids"][:, 0].tolist())
        return super().build_hash_table(enc, decoder_input_ids)

    def classify_ids(self, enc, task, hash_table=None, shadow=False):
        self.calls.append({"firsts": enc["input_ids"][:, 0].tolist(), "table": hash_table, "shadow": shadow})
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("expert forward failed")
        return super().classify_ids(enc, task, hash_table, shadow)


def request(loop, first: int, arrival: float = 0.0, deadline: float = 100.0, length: int = 3, key=("classify", "sst2")):
    ids = [first] + [7] * (length - 1)
    return Request("classify", ids, key, {"task": TASK}, deadline, loop, loop.create_future(), arrival=arrival)


def settle(loop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def outcome(req):
    if not req.future.done():
        return None
    return type(req.future.exception()).__name__ if req.future.exception() else req.future.result().label


class Left:
    def __init__(self):
        self.requests = []

    def __call__(self, r):
        self.requests.append(r)


def batch_worker(runner, left, size=4, wait=0.01):
    return BatchWorker(runner, Batcher(size, 10_000, wait), Metrics(), left)


def firsts(batches) -> list[list[int]]:
    return [[r.ids[0] for r in b.requests] for b in batches]


def test_batch_worker_cuts_full_or_overdue_groups_oldest_first_and_hashes_each(loop):
    runner, left = FakeRunner(), Left()
    worker = batch_worker(runner, left, size=4, wait=0.01)
    a = [request(loop, 10 + i, arrival=0.0, key="a") for i in range(2)]
    b = [request(loop, 20 + i, arrival=0.001, key="b") for i in range(4)]
    assert firsts(worker.step(a + b, now=0.002)) == [[20, 21, 22, 23]]  # b is full; a has not waited long enough
    assert worker.step([], now=0.005) == []
    assert firsts(worker.step([], now=0.02)) == [[10, 11]]  # a's wait ran out
    assert runner.hashed == [[20, 21, 22, 23], [10, 11]]
    c = [request(loop, 30, arrival=0.03, key="c")]
    d = [request(loop, 40, arrival=0.031, key="d")]
    assert firsts(worker.step(c + d, now=0.1)) == [[30], [40]]  # both overdue: the older group goes first


def test_batch_worker_respects_room_and_flush(loop):
    runner, left = FakeRunner(), Left()
    worker = batch_worker(runner, left, size=2, wait=10.0)
    reqs = [request(loop, i, arrival=0.0) for i in range(5)]
    first = worker.step(reqs, now=0.0, room=1)
    assert [[r.ids[0] for r in b.requests] for b in first] == [[0, 1]]  # full batches only, one at a time
    rest = worker.step([], now=0.0, room=None, flush=True)
    assert [[r.ids[0] for r in b.requests] for b in rest] == [[2, 3], [4]]
    assert all(b.table is not None and b.table.experts[0].shape[0] == len(b.requests) for b in first + rest)
    assert left.requests == []  # nothing left the queue yet: batches are only hashed


def test_batch_worker_drops_requests_whose_deadline_passed_before_hashing(loop):
    runner, left = FakeRunner(), Left()
    worker = batch_worker(runner, left, size=4, wait=0.0)
    late, ok = request(loop, 1, deadline=0.5), request(loop, 2, deadline=5.0)
    batches = worker.step([late, ok], now=1.0)
    settle(loop)
    assert [[r.ids[0] for r in b.requests] for b in batches] == [[2]]
    assert runner.hashed == [[2]]
    assert outcome(late) == "DeadlineExceeded" and left.requests == [late]


def hashed(runner, reqs) -> HashedBatch:
    enc = runner.pad([r.ids for r in reqs])
    return HashedBatch(reqs, enc, runner.build_hash_table(enc), 0.0)


def test_inference_answers_the_live_rows_of_a_partly_expired_batch(loop):
    runner, left = FakeRunner(), Left()
    worker = InferenceWorker(runner, Metrics(), left)
    reqs = [request(loop, 4, deadline=9.0), request(loop, 5, deadline=1.0), request(loop, 7, deadline=9.0)]
    worker.step(hashed(runner, reqs), now=2.0)
    settle(loop)
    assert [outcome(r) for r in reqs] == ["negative", "DeadlineExceeded", "positive"]
    (call,) = runner.calls
    assert call["firsts"] == [4, 7]
    assert call["table"].experts[0][:, 0, 0].tolist() == [4, 7]  # the table lost the same row as the batch
    assert sorted(r.ids[0] for r in left.requests) == [4, 5, 7]  # each left the queue exactly once
    assert all(r.started == 2.0 for r in (reqs[0], reqs[2]))


def test_inference_failure_fails_only_that_batch_and_is_counted(loop):
    runner, left = FakeRunner(fail_on_call=1), Left()
    metrics = Metrics()
    worker = InferenceWorker(runner, metrics, left)
    bad = [request(loop, 2), request(loop, 3)]
    good = [request(loop, 4)]
    worker.step(hashed(runner, bad), now=0.0)
    worker.step(hashed(runner, good), now=0.0)
    settle(loop)
    assert [outcome(r) for r in bad] == ["RuntimeError", "RuntimeError"]
    assert outcome(good[0]) == "negative"
    assert metrics.batch_errors["infer"]._value.get() == 1
    assert len(left.requests) == 3


@pytest.mark.parametrize(("rate", "pattern"), [(0.0, "...."), (0.5, ".s.s"), (0.25, "...s"), (1.0, "ssss")])
def test_shadow_routing_is_sampled_at_the_configured_rate(loop, rate, pattern):
    runner = FakeRunner()
    worker = InferenceWorker(runner, Metrics(), Left(), shadow_sample_rate=rate)
    for i in range(4):
        worker.step(hashed(runner, [request(loop, i)]), now=0.0)
    assert "".join("s" if c["shadow"] else "." for c in runner.calls) == pattern


def test_expired_request_error_type(loop):
    worker = InferenceWorker(FakeRunner(), Metrics(), Left())
    r = request(loop, 1, deadline=0.0)
    worker.step(hashed(worker.runner, [r]), now=1.0)
    settle(loop)
    assert isinstance(r.future.exception(), DeadlineExceeded)
