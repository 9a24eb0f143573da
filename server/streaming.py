"""Server-sent events of a streamed completion or chat completion: the inference thread's text deltas become
`data: {chunk}` events; errors are reported in-stream in the envelope (the 200 is already sent); the stream ends
with `data: [DONE]`. `EventStream` runs the event loop; `CompletionStream` and `ChatStream` format its events
(`text_completion` and `chat.completion.chunk` objects)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from sida.server.request import KVCacheTooSmall, Request
from sida.server.schemas import CompletionChoice, CompletionChunk, Usage, error_body

if TYPE_CHECKING:
    from sida.server.metrics import Metrics

DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as JSON."""
    return "data: " + json.dumps(body) + "\n\n"


class EventStream:
    """One streamed call of `n` choices (`per_prompt` choices of each prompt in a row): give `callbacks` to its
    requests, submit them, then `response(reqs, deadline)`. Subclasses say what comes before the first delta
    (`opening`), how a delta reads (`delta`) and what ends a call that succeeded (`closing`)."""

    def __init__(self, cid: str, created: int, model: str, n: int, metrics: Metrics, per_prompt: int = 1):
        self.cid, self.created, self.model = cid, created, model
        self.n = n
        self.metrics = metrics
        self.per_prompt = per_prompt
        self.loop = asyncio.get_running_loop()
        self.deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.callbacks = [self._callback(i) for i in range(n)]

    def _callback(self, i: int) -> Callable[[str], None]:
        """`on_text` of choice i: called from the inference thread, queues the delta on the event loop."""
        return lambda delta: self.loop.call_soon_threadsafe(self.deltas.put_nowait, (i, delta))

    def response(self, reqs: list[Request], deadline: float) -> StreamingResponse:
        """The SSE response of the submitted `reqs`."""
        return StreamingResponse(self.events(reqs, deadline), media_type="text/event-stream")

    async def events(self, reqs: list[Request], deadline: float) -> AsyncIterator[str]:
        """The opening events, deltas as they come, then the closing events (or the error), then `[DONE]`."""
        for event in self.opening():
            yield event
        done = asyncio.ensure_future(asyncio.gather(*(r.future for r in reqs)))
        while True:
            getter = asyncio.ensure_future(self.deltas.get())
            finished, _ = await asyncio.wait(
                {getter, done}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if getter in finished:
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
        """After every request has settled: the deltas still queued, then the closing events (the usage counted
        in the token metrics), or the error."""
        while not self.deltas.empty():
            yield self.delta(*self.deltas.get_nowait())
        try:
            results = done.result()
        except KVCacheTooSmall as e:  # what a plain call answers 400, in-stream
            yield sse(error_body(str(e), "invalid_request_error", "max_tokens", "kv_cache_exceeded"))
            return
        except Exception as e:  # noqa: BLE001 — reported in-stream, the HTTP status is already sent
            yield sse(error_body(str(e), "server_error"))
            return
        usage = Usage.of(results, self.per_prompt)
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)
        yield from self.closing(results, usage)

    def opening(self) -> Iterator[str]:
        """The events before the first delta (none here)."""
        return iter(())

    def delta(self, i: int, text: str) -> str:
        """The event of one text delta of choice i."""
        raise NotImplementedError

    def closing(self, results: list, usage: Usage) -> Iterator[str]:
        """The events after the last delta of a call whose every choice finished."""
        raise NotImplementedError


class CompletionStream(EventStream):
    """`POST /v1/completions` with `stream`: `CompletionChunk` events. With `echo` (the prompt of each choice),
    each choice's first event is its prompt; the finish reasons come in one chunk, and with `include_usage` a
    last chunk has no choices and the call's `usage`."""

    def __init__(
        self,
        cid: str,
        created: int,
        model: str,
        n: int,
        metrics: Metrics,
        per_prompt: int = 1,
        echo: list[str] | None = None,
        include_usage: bool = False,
    ):
        super().__init__(cid, created, model, n, metrics, per_prompt)
        self.echo = echo or []
        self.include_usage = include_usage

    def opening(self) -> Iterator[str]:
        """Each choice's echoed prompt."""
        return (self.delta(i, prompt) for i, prompt in enumerate(self.echo))

    def delta(self, i: int, text: str) -> str:
        return self.chunk([CompletionChoice(index=i, text=text)])

    def closing(self, results: list, usage: Usage) -> Iterator[str]:
        """One chunk with every choice's finish reason; with `include_usage`, one with no choices and the usage."""
        yield self.chunk(
            [CompletionChoice(index=i, text="", finish_reason=r.finish_reason) for i, r in enumerate(results)]
        )
        if self.include_usage:
            yield self.chunk([], usage.model_dump())

    def chunk(self, choices: list[CompletionChoice], usage: dict | None = None) -> str:
        """The event of a `CompletionChunk` with these choices (and, with `include_usage`, `usage`: null on every
        chunk but the last, as OpenAI sends them)."""
        body = CompletionChunk(id=self.cid, created=self.created, model=self.model, choices=choices).model_dump()
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


class ChatStream(EventStream):
    """`POST /v1/chat/completions` with `stream`: `chat.completion.chunk` events, as OpenAI sends them. Each choice
    opens with `delta: {"role": "assistant", "content": ""}`, its text comes as `delta: {"content": ...}`, and a
    chunk with `delta: {}` carries its finish reason; with `include_usage`, a last chunk has no choices and the
    call's `usage` (every other chunk `"usage": null`)."""

    def __init__(self, cid: str, created: int, model: str, n: int, metrics: Metrics, include_usage: bool = False):
        super().__init__(cid, created, model, n, metrics, per_prompt=n)  # one prompt: its n choices
        self.include_usage = include_usage

    def opening(self) -> Iterator[str]:
        return (self.chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n))

    def delta(self, i: int, text: str) -> str:
        return self.chunk(i, {"content": text})

    def closing(self, results: list, usage: Usage) -> Iterator[str]:
        for i, r in enumerate(results):
            yield self.chunk(i, {}, r.finish_reason)
        if self.include_usage:
            yield sse(self.body([], usage.model_dump()))

    def chunk(self, i: int, delta: dict, finish_reason: str | None = None) -> str:
        """The event of one choice's delta."""
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse(self.body([choice]))

    def body(self, choices: list[dict], usage: dict | None = None) -> dict:
        """A `ChatCompletionChunk` as plain JSON types (built per token: no validation is due)."""
        body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        body["choices"] = choices
        if self.include_usage:
            body["usage"] = usage
        return body
