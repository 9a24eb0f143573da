"""Wire types of the HTTP API (OpenAI / vLLM conventions), requests and responses. Only the HTTP layer sees
these; workers get plain `Request` dataclasses (server/request.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

from sida.offload.tasks import get_task

INT64 = 2**63  # seeds are torch's 64-bit integers
MAX_TOKENS = 512  # the most tokens one choice generates


def _unicode(texts) -> bool:
    """Every text is valid Unicode: a JSON escape can spell a lone surrogate, which no tokenizer takes."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a last event with the call's token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationFields(BaseModel):
    """The fields every generating endpoint takes: OpenAI's sampling fields and vLLM's `repetition_penalty` and
    `ignore_eos` (generate `max_tokens` whatever eos says); `user` is accepted and only logged. Unknown fields
    are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # 1 = off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None  # with stream: include_usage
    n: int = Field(1, ge=1, le=128)  # choices per prompt: prompt i's choice j has index i * n + j
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream set to true")
        return v

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list (empty without `stop`)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def max_new_tokens(self) -> int:
        """The most tokens each choice generates."""
        return self.max_tokens


class CompletionRequest(GenerationFields):
    """`POST /v1/completions`: one prompt or a list of them, each continued `n` times."""

    prompt: str | list[str]
    logprobs: Annotated[int, Strict()] | None = Field(None, ge=0, le=5)  # top alternatives per token
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        if not _unicode(prompts):
            raise ValueError("prompt must be valid Unicode (no lone surrogate escapes)")
        return v

    @property
    def prompts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    """One part of a message's content: text is the only kind a text model reads."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat: its author's role and its text (a string, or text parts read as one)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in v):
            raise ValueError('content parts must be text ({"type": "text", "text": ...}): this model reads only text')
        return v

    @property
    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM joins them."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationFields):
    """`POST /v1/chat/completions`: a chat, answered `n` times by the assistant. The model's chat template turns
    `messages` into its prompt. `max_completion_tokens` (OpenAI's newer name) wins over `max_tokens`;
    `top_logprobs` (0–5) needs `logprobs`; `stream_options` needs `stream`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: Annotated[bool, Strict()] | None = False  # null: false
    top_logprobs: Annotated[int, Strict()] | None = Field(None, ge=0, le=5)

    @field_validator("messages")
    @classmethod
    def _chat(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must hold at least one message")
        if not _unicode(m.text for m in v):
            raise ValueError("messages must be valid Unicode (no lone surrogate escapes)")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    @property
    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template reads them: `{"role", "content"}` with the content as one string."""
        return [{"role": m.role, "content": m.text} for m in self.messages]

    @property
    def max_new_tokens(self) -> int:
        """The most tokens each choice generates: `max_completion_tokens`, else `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_k(self) -> int | None:
        """The alternatives per token whose log-probs are recorded: None without `logprobs`."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyRequest(BaseModel):
    """`input` is one input or a list of them. An input of a single-text task (sst2) is a string; an input of a
    task with several texts (mrpc: sentence1, sentence2) is a list with one string per text."""

    model_config = ConfigDict(extra="ignore")

    model: str
    task: str = "sst2"  # before `input`, whose check reads it
    input: str | list[str] | list[list[str]]

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        get_task(v)  # ValueError names the known tasks
        return v

    @field_validator("input")
    @classmethod
    def _inputs_fit_the_task(cls, v, info: ValidationInfo):
        task = info.data.get("task")
        if task is None:  # the task was refused: that is the error reported
            return v
        fields = get_task(task).fields
        items = _split(v, len(fields))
        if not items:
            raise ValueError("input must not be empty")
        for texts in items:
            if len(texts) != len(fields) or any(not t.strip() for t in texts):
                raise ValueError(f"each input of task {task} is {len(fields)} non-empty text(s) ({', '.join(fields)})")
            if not _unicode(texts):
                raise ValueError("input must be valid Unicode (no lone surrogate escapes)")
        return v

    @property
    def inputs(self) -> list[tuple[str, ...]]:
        """The texts of each input, in the task's field order."""
        return _split(self.input, len(get_task(self.task).fields))


def _split(v: str | list[str] | list[list[str]], n_fields: int) -> list[tuple[str, ...]]:
    """`input` as one tuple of texts per input."""
    if isinstance(v, str):
        return [(v,)]
    if all(isinstance(x, list) for x in v):
        return [tuple(x) for x in v]
    if n_fields > 1:  # a flat list is one input of a multi-text task
        return [tuple(v)]
    return [(x,) for x in v]


# ---------------------------------------------------------------------------------------------- responses


class PromptUsage(BaseModel):
    """Tokens read by a call that generates nothing (classification)."""

    prompt_tokens: int
    total_tokens: int


class Usage(BaseModel):
    """Tokens read and generated by a completion call."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, results, n: int = 1) -> Usage:
        """The sum over a call's completions (each has `prompt_tokens` and `completion_tokens`), `n` per prompt
        in a row: each prompt is counted once."""
        prompt = sum(r.prompt_tokens for r in results[::n])
        completion = sum(r.completion_tokens for r in results)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ClassifyItem(BaseModel):
    """The label of one input and the probability of each of the task's labels."""

    index: int
    label: str
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    """`POST /v1/classify`: one item per input, in input order."""

    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyItem]
    usage: PromptUsage


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completion log-probs, one entry per token of the choice's text: its text, the model's
    log-prob of it, the top alternatives by text (the chosen token's among them), its offset in the text. An
    echoed prompt's tokens have null log-probs: the prompt is the encoder's input, not something it predicts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """The text generated for one choice (in a stream: one delta, `finish_reason` set on the last)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """`POST /v1/completions` without `stream`: one choice per prompt, in prompt order."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent event of `POST /v1/completions` with `stream`: `data: {chunk}`, then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    """The one model this server serves, with the classification tasks `/v1/classify` takes for it."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "sida"
    created: int = 0
    family: str | None = None  # the config's model_type, e.g. "switch_transformers", "olmoe"
    tasks: list[str] = []


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    """`GET /health/live` and `/health/ready` when the answer is yes."""

    status: Literal["ok", "ready"]


class ErrorDetail(BaseModel):
    """What went wrong: `param` names the request field at fault, `code` is machine-readable."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The envelope every error leaves in."""

    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """An `ErrorResponse` as plain JSON types (built on error paths and in streams, where no validation is due)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
