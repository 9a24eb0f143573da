"""Wire types of the HTTP API (OpenAI / vLLM conventions). Only the HTTP layer sees these; workers get
plain `Request` dataclasses (server/request.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sida.offload.datasets import get_task


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=512)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per prompt

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
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
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ClassifyRequest(BaseModel):
    """`input` is one input or a list of them. An input of a single-text task (sst2) is a string; an input of a
    task with several texts (mrpc: sentence1, sentence2) is a list with one string per text."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[list[str]]
    task: str = "sst2"

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        get_task(v)  # ValueError names the known tasks
        return v

    @model_validator(mode="after")
    def _inputs_fit_the_task(self) -> ClassifyRequest:
        fields = get_task(self.task).fields
        items = self.inputs
        if not items:
            raise ValueError("input must not be empty")
        for texts in items:
            if len(texts) != len(fields) or any(not t.strip() for t in texts):
                raise ValueError(
                    f"each input of task {self.task} is {len(fields)} non-empty text(s) ({', '.join(fields)})"
                )
        return self

    @property
    def inputs(self) -> list[tuple[str, ...]]:
        """The texts of each input, in the task's field order."""
        v = self.input
        if isinstance(v, str):
            return [(v,)]
        if all(isinstance(x, list) for x in v):
            return [tuple(x) for x in v]
        if len(get_task(self.task).fields) > 1:  # a flat list is one input of a multi-text task
            return [tuple(v)]
        return [(x,) for x in v]


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
