"""Wire types of the HTTP API (OpenAI / vLLM conventions), requests and responses. Only the HTTP layer sees
these; workers get plain `Request` dataclasses (server/request.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

from sida.offload.tasks import get_task

INT64 = 2**63  # seeds are torch's 64-bit integers


def _unicode(texts) -> bool:
    """Every text is valid Unicode: a JSON escape can spell a lone surrogate, which no tokenizer takes."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: one prompt or a list of them, each continued `n` times. The sampling fields are
    OpenAI's, and vLLM's `repetition_penalty`; `user` is accepted and only logged."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=512)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # 1 = off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    n: int = Field(1, ge=1, le=128)  # choices per prompt: prompt i's choice j has index i * n + j
    logprobs: Annotated[int, Strict()] | None = Field(None, ge=0, le=5)  # top alternatives per token
    echo: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        if not _unicode(prompts):
            raise ValueError("prompt must be valid Unicode (no lone surrogate escapes)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @property
    def prompts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list (empty without `stop`)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
