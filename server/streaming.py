"""Server-sent events of a streamed completion: the inference thread's text deltas become
`data: {CompletionChunk}` events; errors are reported in-stream in the envelope (the 200 is already sent);
the stream ends with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from sida.server.request import Request
from sida.server.schemas import CompletionChoice, CompletionChunk, Usage, error_body

if TYPE_CHECKING:
    from sida.server.metrics import Metrics

DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as JSON."""
    return "data: " + json.dumps(body) + "\n\n"


class CompletionStream:
    """One streamed completion call: give `callbacks` to its requests (one per choice: `per_prompt` choices of
    each prompt in a row), submit them, then `response(reqs, deadline)`. With `echo` (the prompt of each
    choice), each choice's first event is its prompt."""

    def __init__(
        self,
        cid: str,
        created: int,
        model: str,
        n: int,
        metrics: Metrics,
        per_prompt: int = 1,
        echo: list[str] | None = None,
    ):
        self.cid, self.created, self.model = cid, created, model
        self.metrics = metrics
        self.per_prompt = per_prompt
        self.loop = asyncio.get_running_loop()
        self.echo = echo or []
        self.deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.callbacks = [self._callback(i) for i in range(n)]

    def _callback(self, i: int) -> Callable[[str], None]:
        """`on_text` of prompt i: called from the inference thread, queues the delta on the event loop."""
        return lambda delta: self.loop.call_soon_threadsafe(self.deltas.put_nowait, (i, delta))

    def response(self, reqs: list[Request], deadline: float) -> StreamingResponse:
        """The SSE response of the submitted `reqs`; time to first token counts from now."""
        return StreamingResponse(self.events(reqs, deadline, time.perf_counter()), media_type="text/event-stream")

    async def events(self, reqs: list[Request], deadline: float, t0: float) -> AsyncIterator[str]:
        """The echoed prompts, deltas as they come, then the finish reasons (or the error), then `[DONE]`."""
        for i, prompt in enumerate(self.echo):
            yield self.delta(i, prompt)
        done = asyncio.ensure_future(asyncio.gather(*(r.future for r in reqs)))
        first = True
        while True:
            getter = asyncio.ensure_future(self.deltas.get())
            finished, _ = await asyncio.wait(
                {getter, done}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if getter in finished:
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                    first = False
                yield self.delta(*getter.result())
                continue
            getter.cancel()
            if done in finished:
                for event in self.finish(done):
                    yield event
            else:
                yield sse(error_body("deadline exceeded", "timeout_error", code="deadline_exceeded"))
            break
        yield DONE

    def finish(self, done: asyncio.Future) -> Iterator[str]:
        """After every request has settled: the deltas still queued, then the finish reasons and the usage count,
        or the error."""
        while not self.deltas.empty():
            yield self.delta(*self.deltas.get_nowait())
        try:
            results = done.result()
        except Exception as e:  # noqa: BLE001 — reported in-stream, the HTTP status is already sent
            yield sse(error_body(str(e), "server_error"))
            return
        yield self.chunk(
            [CompletionChoice(index=i, text="", finish_reason=r.finish_reason) for i, r in enumerate(results)]
        )
        usage = Usage.of(results, self.per_prompt)
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)

    def delta(self, i: int, text: str) -> str:
        """The event of one text delta of prompt i."""
        return self.chunk([CompletionChoice(index=i, text=text)])

    def chunk(self, choices: list[CompletionChoice]) -> str:
        """The event of a `CompletionChunk` with these choices."""
        body = CompletionChunk(id=self.cid, created=self.created, model=self.model, choices=choices)
        return sse(body.model_dump())
