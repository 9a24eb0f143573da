"""`POST /v1/chat/completions` beside the completion handler: the chat's prompt through the model's chat template,
and OpenAI's `chat.completion` wire types (the answer, its chunks when streamed, its log-probs in the chat form)
with the functions that build them from the runner's results. The request is `ChatCompletionRequest`
(schemas.py); the handler, which submits the choices as /v1/completions does, is in routes.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from sida.offload.runner import NoChatTemplate
from sida.offload.sampling import TokenLogprobs
from sida.server.errors import invalid
from sida.server.schemas import ChatCompletionRequest, Usage
from sida.server.state import State


class TopLogprob(BaseModel):
    """A token's text, the model's log-prob of it, and its UTF-8 bytes (a token may be part of a character)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """One generated token, with the likeliest alternatives at its position (`top_logprobs` of them)."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A choice's log-probs: one entry per generated token, in order (their texts concatenate to the content)."""

    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    """What the assistant answered."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One answer of a chat call."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    """`POST /v1/chat/completions` without `stream`: `n` answers to the chat."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What one chunk adds to a choice: the role first, then text; empty in the chunk with the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice's part of a chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of `POST /v1/chat/completions` with `stream`: `data: {chunk}`, then `data: [DONE]`.
    With `stream_options.include_usage`, the last chunk has no choices and the call's `usage`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def chat_prompt(state: State, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the chat through the model's chat template, ending where the answer begins: 400
    `chat_template_missing` where the model has none, `context_length_exceeded` over `max_input_tokens`."""
    try:
        ids = state.runner.chat_ids(body.chat)
    except NoChatTemplate:
        raise invalid(
            f"messages: model {state.opts.model_name!r} has no chat template, so a chat cannot become its prompt; "
            "use /v1/completions with a prompt instead",
            "messages",
            "chat_template_missing",
        ) from None
    limit = state.opts.max_input_tokens
    if len(ids) > limit:
        message = f"messages: the chat is {len(ids)} tokens through the chat template; the limit is {limit}"
        raise invalid(message, "messages", "context_length_exceeded")
    return ids


def chat_logprobs(lp: TokenLogprobs, k: int) -> ChatLogprobs:
    """The runner's log-probs of a choice in the chat form: per token its text, log-prob and bytes, and the `k`
    likeliest tokens at its position, likeliest first. The runner records the k likeliest and adds the sampled
    token; OpenAI lists the k likeliest only, so the sampled token is among them only where it is one of them."""
    content = []
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        best = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k]
        alternatives = [TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in best]
        content.append(
            TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=alternatives)
        )
    return ChatLogprobs(content=content)


def chat_response(
    cid: str, created: int, model: str, k: int | None, results: list, usage: Usage
) -> ChatCompletionResponse:
    """The answer of a call's results (one per choice), with the chat form of their log-probs when `k` (the
    alternatives per token) is not None."""
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=chat_logprobs(r.logprobs, k) if k is not None and r.logprobs is not None else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(id=cid, created=created, model=model, choices=choices, usage=usage)
