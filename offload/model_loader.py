"""Loading a MoE model from a local Hugging Face folder — never from the hub — and fingerprinting it.

Two ways: the whole model as Hugging Face loads it (`experts="device"`: resident serving, trace
collection), or under offload (`experts="host"`): the model is built on the meta device, every dense
tensor is read from the checkpoint onto the device, and the experts stay in the checkpoint, to be read
into the host store by the offload engine. Then no expert tensor ever reaches the device except through
the engine's slots, and no expert is held twice in host memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SwitchTransformersForConditionalGeneration
from transformers.utils import logging as hf_logging

from sida.offload.adapters import MoEAdapter, adapter_for
from sida.offload.checkpoint import Checkpoint, CheckpointError
from sida.offload.expert_layout import CheckpointExperts, ExpertLayout
from sida.offload.weight_map import WeightMapError, map_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelLoadError(RuntimeError):
    """The model folder cannot be used; the message names the file and what was expected."""


@dataclass
class LoadedModel:
    """A model from a local folder, with its tokenizer, family adapter, config and fingerprint."""

    model: nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    adapter: MoEAdapter
    config: object
    path: Path
    fingerprint: str
    experts: CheckpointExperts | None = None  # set when the experts were left in the checkpoint (experts="host")

    @property
    def name(self) -> str:
        """The model folder's name."""
        return self.path.name

    @property
    def family(self) -> str:
        """The config's `model_type`, e.g. "switch_transformers", "olmoe"."""
        return self.adapter.family

    @property
    def is_encoder_decoder(self) -> bool:
        return self.adapter.is_encoder_decoder

    def decoder_start_ids(self, rows: int, device=None) -> torch.Tensor | None:
        """[rows, 1] the decoder's first input for a batch of `rows` sequences (None for a decoder-only model)."""
        return self.adapter.decoder_start_ids(self.model, rows, device)


FINGERPRINT_WHOLE = 256 << 20  # weight files up to this size are hashed into the fingerprint directly
FINGERPRINT_CACHE = Path.home() / ".cache" / "sida" / "fingerprints.json"  # path, size, times, inode → digest


def fingerprint(model_dir: str | Path, cache: Path | None = FINGERPRINT_CACHE) -> str:
    """sha256 over config.json's content and, per weight file, its name, size and every byte: small files
    directly, larger ones (over FINGERPRINT_WHOLE) through their own sha256.

    Artifacts built for a model (predictor, traces, the disk tier's expert file) store it and are refused by a
    different model; a fine-tune that changes a few experts changes it. A large file is read once: its digest
    is kept in `cache`, keyed by the file's path, size, modification and change times and inode (a same-size
    file copied over it with its mtime kept, `cp -p`, still gets a new inode or change time).
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}".encode())
        if stat.st_size <= FINGERPRINT_WHOLE:
            digest.update(f.read_bytes())
            continue
        known = _read_cache(cache)
        key = f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
        if key not in known:
            known[key] = _file_digest(f)
            _write_cache(cache, known)
        digest.update(known[key].encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(cache: Path | None, known: dict) -> None:
    """Best effort: a cache that cannot be written only costs reading the file again next time."""
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    except OSError:
        pass


def check_model_dir(model_dir: str | Path) -> dict:
    """The folder's config.json as a dict, after cheap checks with one clear ModelLoadError each, before
    transformers gets a chance to raise a traceback."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{config_path} has no 'model_type'")
    try:
        adapter = adapter_for(config["model_type"])
        if not adapter.is_encoder_decoder:  # whether it has MoE layers shows in its modules, built here on meta
            with torch.device("meta"):
                adapter.moe_layers(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: {e}") from None
    if not list(model_dir.glob("*.safetensors")):
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickled)}: pickle checkpoints are refused, convert to safetensors)" if pickled else ""
        )
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights{hint}")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_dir} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return config


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", experts: str = "device"
) -> LoadedModel:
    """Load a local Hugging Face folder (safetensors only, never the hub); one-line ModelLoadError otherwise.

    experts: "device" loads every weight onto `device`; "host" loads only the dense weights there and leaves
    the experts in the checkpoint (`LoadedModel.experts`), their modules on the meta device."""
    if experts not in ("device", "host"):
        raise ValueError(f"experts must be 'device' or 'host', got {experts!r}")
    hf_logging.disable_progress_bar()  # one-line errors and clean stderr; sida reports its own progress

    model_dir = Path(model_dir)
    config = check_model_dir(model_dir)
    dtype = resolve_dtype(dtype, config)
    source = None
    try:
        if experts == "host":
            model, source = _load_dense(model_dir, config["model_type"], dtype, torch.device(device))
        else:
            model = _load_whole(model_dir, config["model_type"], dtype).to(device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load weights from {model_dir}: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {e}") from None
    model.eval()
    fp = fingerprint(model_dir)
    return LoadedModel(model, tokenizer, adapter_for(config["model_type"]), model.config, model_dir, fp, source)


def resolve_dtype(dtype: str | torch.dtype, config: dict) -> torch.dtype:
    """A dtype name, or "auto": a bfloat16 checkpoint stays bfloat16 (its experts keep half the bytes); anything else
    runs in float32 (float16 kernels are slow or missing on CPU, and Switch overflows in float16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = config.get("dtype") or config.get("torch_dtype")
        return torch.bfloat16 if stored == "bfloat16" else torch.float32
    return getattr(torch, dtype)


def model_class(model_type: str) -> type:
    """The Hugging Face class that loads a family: Switch's own, or the causal LM class of `model_type`."""
    return SwitchTransformersForConditionalGeneration if model_type == "switch_transformers" else AutoModelForCausalLM


def _load_whole(model_dir: Path, model_type: str, dtype: torch.dtype) -> nn.Module:
    """The whole model, by Hugging Face's loader."""
    model, info = model_class(model_type).from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, output_loading_info=True
    )
    # from_pretrained silently random-initialises missing tensors: a truncated checkpoint must fail instead.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("lm_head.weight")]
    if missing:
        raise ModelLoadError(f"{model_dir}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    return model


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in this block get their parameters on the meta device (no memory, no initialisation cost) and
    their buffers real: a rotary embedding's `inv_freq` is computed in `__init__` and stored in no checkpoint. The
    patch is process-wide: start-up builds the model before any worker thread builds modules."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(model_dir: Path, model_type: str, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on meta, in `dtype`; buffers real and in the dtype Hugging Face gives them."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    cls = model_class(model_type)
    with parameters_on_meta():
        model = cls(config) if cls is not AutoModelForCausalLM else cls.from_config(config)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
    return model


def _load_dense(
    model_dir: Path, model_type: str, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, CheckpointExperts]:
    """The model with its dense weights on `device` and its experts on meta, and the experts' checkpoint."""
    model = _skeleton(model_dir, model_type, dtype)
    adapter = adapter_for(model_type)
    layers = adapter.moe_layers(model)
    experts = {(la.index, e): m for la in layers for e, m in enumerate(la.experts)}
    layout = ExpertLayout.of(layers[0].experts[0])
    try:
        checkpoint = Checkpoint(model_dir)
        weights = map_weights(model, experts, layout, checkpoint)
    except (CheckpointError, WeightMapError) as e:
        raise ModelLoadError(f"{model_dir}: {e}") from None
    dense = {}
    for target, name in weights.dense.items():
        info = checkpoint.tensors[name]
        cast = dtype if info.dtype.is_floating_point else None
        dense[target] = checkpoint.read(name, cast).to(device)
    model.load_state_dict(dense, strict=False, assign=True)
    model.tie_weights()  # the embeddings (and a tied lm_head) share the one tensor the checkpoint stores
    left = [n for n, t in model.named_parameters() if t.is_meta and n not in weights.expert_params]
    if left:
        raise ModelLoadError(f"{model_dir}: weights missing for {len(left)} tensors, e.g. {left[0]}")
    for module in model.modules():  # buffers were built on the host
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model, CheckpointExperts(checkpoint, layout, weights.experts)
