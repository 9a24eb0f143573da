"""The one settings object: defaults < YAML file < `SIDA_*` environment < CLI flags.

Read once in `main`; everything inward gets plain arguments (STYLE.md §2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from sida.offload.engine import OffloadConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "sida-switch-demo"


class SettingsError(ValueError):
    """A configuration problem, already phrased for the user (one line per bad field)."""


class Settings(BaseSettings):
    """Every setting of sida, typed and validated; field names are the YAML keys, `SIDA_<NAME>` env and flags."""

    model_config = SettingsConfigDict(env_prefix="SIDA_", extra="forbid", validate_default=True, frozen=True)

    model_dir: Path = DEFAULT_MODEL_DIR
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: a bfloat16 checkpoint's own, else float32
    torch_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    max_input_tokens: int = 512
    max_new_tokens: int = 32
    batch_size: int = 32  # examples per forward in `sida eval`
    # offload (offload/engine.py)
    mode: Literal["resident", "exact", "predicted"] = "exact"
    budget_experts: int | None = None  # device slots for all MoE layers together; wins over `budget`
    budget_bytes: int | None = None
    budget: Literal["auto", "half"] | None = None  # None: auto on CUDA, half of all experts on CPU
    device_memory_limit: int | None = None  # bytes sida may place on the device; None: what the device has
    policy: Literal["fifo", "lru", "lfu", "layered"] = "lru"
    tier: Literal["ram", "disk"] = "ram"
    prefetch_k: int = 1
    expert_dir: Path | None = None  # tier 'disk': where the per-model expert file is written once
    disk_io: Literal["direct", "dontneed"] = "direct"  # tier 'disk': O_DIRECT, or page cache dropped after reads
    predictor: Path | None = None  # default: the predictor shipped in the model folder
    # serving (server/app.py, server/pipeline.py)
    served_model_name: str | None = None  # default: the model folder's name
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_batch_wait_ms: float = 5.0
    max_queue: int = 256
    # a decoder-only model's completions join one running decode batch (continuous) or run as whole batches (static)
    batching: Literal["continuous", "static"] = "continuous"
    kv_cache_bytes: int | None = None  # continuous: the running sequences' KV bound; None: max_batch_size full ones
    request_timeout_s: float = 60.0
    # an inference step (batch, decode step) running longer turns readiness 503 (server/watchdog.py);
    # None: the larger of request_timeout_s and 5 × the slowest step measured
    step_timeout_s: float | None = None
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 30.0  # a request body not received within this is answered 408
    head_timeout_s: float = 10.0  # a request line and headers not received within this: 408, connection closed
    api_key: str | None = None
    shadow_sample_rate: float = 0.1  # predicted mode: share of batches also routed by the router, for hit rates
    hash_torch_threads: int | None = None  # torch threads of the batch worker, which builds hash tables; None: 1 on CPU
    replicas: int | None = None  # `sida serve` as N Ray Serve replicas behind one entry (server/ray_serve.py)
    ray_address: str | None = None  # with replicas: the Ray cluster to join (None: RAY_ADDRESS, else a new one)
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"model directory {v} does not exist")
        if not (v / "config.json").is_file():
            raise ValueError(f"{v} is not a Hugging Face model folder (no config.json)")
        return v

    @field_validator(
        "torch_threads",
        "hash_torch_threads",
        "max_input_tokens",
        "max_new_tokens",
        "batch_size",
        "budget_experts",
        "prefetch_k",
        "max_batch_size",
        "max_batch_tokens",
        "max_queue",
        "max_body_bytes",
        "replicas",
    )
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("body_timeout_s", "head_timeout_s", "step_timeout_s")
    @classmethod
    def _above_zero(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("request_timeout_s", "max_batch_wait_ms")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("shadow_sample_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("must be between 0 and 1")
        return v

    @field_validator("budget_bytes", "device_memory_limit", "kv_cache_bytes")
    @classmethod
    def _bytes(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive number of bytes")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> Settings:
        if self.budget_experts is not None and self.budget_bytes is not None:
            raise ValueError("set budget_experts or budget_bytes, not both")
        return self

    def offload_config(self, device_type: str = "cpu") -> OffloadConfig:
        """The offload engine's part of the settings, for a device of `device_type`."""
        return OffloadConfig(
            mode=self.mode,
            budget_experts=self.budget_experts,
            budget_bytes=self.budget_bytes,
            budget=self.budget or ("auto" if device_type == "cuda" else "half"),
            policy=self.policy,
            tier=self.tier,
            prefetch_k=self.prefetch_k,
            expert_dir=self.expert_dir,
            disk_io=self.disk_io,
            device_memory_limit=self.device_memory_limit,
            max_batch=self.max_batch_size,
            max_tokens=self.max_input_tokens,
        )

    @property
    def drain_timeout_s(self) -> float:
        """How long a stop waits for accepted requests: their deadline (`request_timeout_s`) and a 5 s margin."""
        return self.request_timeout_s + 5.0

    @property
    def mode_is_explicit(self) -> bool:
        """True when the mode came from a flag, the environment or a config file (not the default)."""
        return "mode" in self.model_fields_set

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 < v < 65536:
            raise ValueError("must be a TCP port, 1..65535")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: CLI flags (init kwargs), then SIDA_* env, then the YAML file.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional YAML file (or `SIDA_CONFIG`), the environment and CLI overrides.

    Overrides that are None (flags not given) are ignored; every problem comes back as one SettingsError.
    """
    config_file = config_file or os.environ.get("SIDA_CONFIG")
    cls = Settings
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} not found")
        _check_yaml(config_file)
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config_file}})
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise SettingsError(_describe(e, config_file)) from None


def _check_yaml(path: Path) -> None:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SettingsError(f"config file {path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise SettingsError(f"config file {path} must be a mapping of setting: value")


def _describe(e: ValidationError, config_file: Path | None) -> str:
    where = f" (config file {config_file}, SIDA_* env or flags)" if config_file else ""
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "extra_forbidden":
            known = ", ".join(Settings.model_fields)
            lines.append(f"unknown setting {field!r}; known settings: {known}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"setting {field!r}: {msg} (got {err.get('input')!r})")
    return "; ".join(lines) + where
