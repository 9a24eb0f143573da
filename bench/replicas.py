"""Random-weight replicas of real decoder-only MoE models (OLMoE-1B-7B-0924, Qwen3-30B-A3B) as local Hugging Face
folders, for benchmarks that need real shapes and no download.

The shapes are the published config values; the weights are random, normal with std 0.02 (norm weights ones), in
the target dtype. Tensor names and the per-expert layout (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`,
router `mlp.gate.weight`) are those of the hub checkpoints, which is also what `save_pretrained` writes, so the folder
loads with `AutoModelForCausalLM.from_pretrained` and sida reads its experts as it would the real model's. Files
are written one tensor at a time (each generated right before it is written, so memory holds one tensor), in
shards of at most 2 GB with a `model.safetensors.index.json`, and a `replica.json` stamp written last marks the
folder complete: a rerun with the same arguments does nothing.

Neither model's tokenizer is available offline, so the folder gets the demo model's 8k BPE tokenizer, with a
placeholder token `<rN>` for each further id up to the real vocab_size (so the embedding and lm_head have their real
size, and every id a random model generates decodes to text); the config's pad/eos/bos ids are that tokenizer's.

    .venv/bin/python bench/replicas.py olmoe-1b-7b            # 8 of 16 layers -> runs/replicas/olmoe-1b-7b-8l
    .venv/bin/python bench/replicas.py qwen3-30b-a3b --layers 4 --out /tmp/q3
    .venv/bin/python bench/replicas.py qwen3-30b-a3b --shrink  # tiny, same family and layout (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GenerationConfig, OlmoeConfig, PreTrainedConfig, Qwen3MoeConfig

from sida.offload.checkpoint import SafetensorsWriter

REPO = Path(__file__).resolve().parent.parent

DEMO = REPO / "models" / "sida-switch-demo"
MAX_SHARD_BYTES = 2 * 10**9  # "2GB" as transformers counts it
STD = 0.02
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STAMP = "replica.json"


@dataclass(frozen=True)
class Shape:
    """One published model: its config class and values, how many layers a default replica keeps, and the
    small values `--shrink` puts in their place (same family, same tensor names)."""

    config_cls: type[PreTrainedConfig]
    architecture: str
    values: dict
    default_layers: int
    shrink: dict = field(default_factory=dict)
    expert_intermediate: str = "intermediate_size"  # the config field holding each expert's hidden width
    qk_norm_per_head: bool = False  # Qwen3 normalises q and k per head [head_dim]; OLMoE over the whole projection


# --shrink: tiny widths, 2 layers; the vocabulary still holds every id of the demo tokenizer (8006)
SHRINK = dict(vocab_size=8192, hidden_size=64, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
              num_attention_heads=4)  # fmt: skip
SHAPES: dict[str, Shape] = {
    "olmoe-1b-7b": Shape(
        OlmoeConfig,
        "OlmoeForCausalLM",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_experts=64,
            num_experts_per_tok=8,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            norm_topk_prob=False,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        default_layers=8,
        shrink={**SHRINK, "intermediate_size": 32, "num_key_value_heads": 4},
    ),
    "qwen3-30b-a3b": Shape(
        Qwen3MoeConfig,
        "Qwen3MoeForCausalLM",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,  # not hidden_size / heads (64): q_proj is [4096, 2048]
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            max_position_embeddings=40960,
            use_sliding_window=False,
            max_window_layers=48,
            tie_word_embeddings=False,
        ),
        default_layers=4,
        shrink={
            **SHRINK,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_window_layers": 2,
        },
        expert_intermediate="moe_intermediate_size",
        qk_norm_per_head=True,
    ),
}


@dataclass(frozen=True)
class Spec:
    """One tensor of the checkpoint: its name, shape, initialisation and whether it belongs to an expert."""

    name: str
    shape: tuple[int, ...]
    ones: bool = False
    expert: bool = False


def replica_config(
    shape: str, layers: int | None = None, shrink: bool = False, dtype: torch.dtype = torch.bfloat16
) -> PreTrainedConfig:
    """The transformers config of `shape` (shrunk if asked), cut to `layers` layers (its default if None), with the
    demo tokenizer's special-token ids."""
    s = SHAPES[shape]
    values = {**s.values, **(s.shrink if shrink else {})}
    full = values["num_hidden_layers"]
    if layers is not None and not 1 <= layers <= full:
        raise ValueError(f"{shape} has {full} layers; --layers {layers} is out of range")
    values["num_hidden_layers"] = layers or (full if shrink else s.default_layers)
    if "max_window_layers" in values:
        values["max_window_layers"] = values["num_hidden_layers"]
    cfg = s.config_cls(**values, **tokenizer_ids(DEMO))
    cfg.architectures = [s.architecture]
    cfg.dtype = dtype
    return cfg


def tokenizer_ids(folder: Path) -> dict[str, int | None]:
    """pad/eos/bos token ids of the tokenizer in `folder` (None where its tokenizer_config names no such token)."""
    names = json.loads((folder / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {}
    for kind in ("pad", "eos", "bos"):
        token = names.get(f"{kind}_token")
        ids[f"{kind}_token_id"] = None if token is None else tok.token_to_id(token)
    return ids


def tensor_specs(shape: str, cfg: PreTrainedConfig) -> list[Spec]:
    """Every tensor of the checkpoint, in model order, with the names and per-expert layout the hub uses."""
    s = SHAPES[shape]
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, s.expert_intermediate)
    specs = [Spec("model.embed_tokens.weight", (cfg.vocab_size, hidden))]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        specs += [
            Spec(p + "input_layernorm.weight", (hidden,), ones=True),
            Spec(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            Spec(p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            Spec(p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            Spec(p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            Spec(p + "self_attn.q_norm.weight", (head_dim if s.qk_norm_per_head else heads * head_dim,), ones=True),
            Spec(p + "self_attn.k_norm.weight", (head_dim if s.qk_norm_per_head else kv * head_dim,), ones=True),
            Spec(p + "post_attention_layernorm.weight", (hidden,), ones=True),
        ]
        specs += _mlp_specs(p + "mlp.", cfg, layer, hidden, inter)
    specs += [Spec("model.norm.weight", (hidden,), ones=True), Spec("lm_head.weight", (cfg.vocab_size, hidden))]
    return specs


def _mlp_specs(p: str, cfg: PreTrainedConfig, layer: int, hidden: int, inter: int) -> list[Spec]:
    """The router and experts of a MoE layer, or the dense MLP of a layer Qwen3's sparsity rule leaves dense."""
    step = getattr(cfg, "decoder_sparse_step", 1)
    if layer in (getattr(cfg, "mlp_only_layers", None) or []) or (layer + 1) % step:
        dense = cfg.intermediate_size
        return [
            Spec(p + "gate_proj.weight", (dense, hidden)),
            Spec(p + "up_proj.weight", (dense, hidden)),
            Spec(p + "down_proj.weight", (hidden, dense)),
        ]
    specs = [Spec(p + "gate.weight", (cfg.num_experts, hidden))]
    for e in range(cfg.num_experts):
        q = f"{p}experts.{e}."
        specs += [
            Spec(q + "gate_proj.weight", (inter, hidden), expert=True),
            Spec(q + "up_proj.weight", (inter, hidden), expert=True),
            Spec(q + "down_proj.weight", (hidden, inter), expert=True),
        ]
    return specs


def nbytes(spec: Spec, dtype: torch.dtype) -> int:
    return math.prod(spec.shape) * dtype.itemsize


def plan_shards(specs: list[Spec], dtype: torch.dtype, max_bytes: int) -> list[list[Spec]]:
    """Consecutive tensors packed greedily into shards of at most `max_bytes` (one tensor alone may exceed it)."""
    shards: list[list[Spec]] = [[]]
    used = 0
    for spec in specs:
        size = nbytes(spec, dtype)
        if size % 8:  # SafetensorsWriter would add `__pad_N` tensors, which transformers reports as unexpected keys
            raise ValueError(f"{spec.name} {spec.shape} is {size} bytes, not a multiple of 8")
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def generate(spec: Spec, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The tensor's values: ones for norms, else normal(0, STD) from a generator seeded by (seed, name), so a value
    does not depend on the order of writing, the sharding or the layer count."""
    if spec.ones:
        return torch.ones(spec.shape, dtype=dtype)
    # 32 bits of seed: torch's CPU generator (mt19937) ignores the upper half of a 64-bit seed
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{spec.name}".encode()))
    return torch.empty(spec.shape, dtype=dtype).normal_(0.0, STD, generator=gen)


def write_shard(path: Path, specs: list[Spec], dtype: torch.dtype, seed: int) -> None:
    """One safetensors file, one tensor in memory at a time; no file under `path` unless complete."""
    writer = SafetensorsWriter(path, [(s.name, dtype, s.shape) for s in specs], {"format": "pt"})
    try:
        for spec in specs:
            writer.write(spec.name, generate(spec, dtype, seed))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def write_replica(
    shape: str,
    out: Path,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shrink: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log=print,
) -> dict:
    """Write the replica folder `out` (or keep it, if its stamp says it holds this very replica); its summary."""
    out = Path(out)
    cfg = replica_config(shape, layers, shrink, dtype)
    specs = tensor_specs(shape, cfg)
    key = dict(
        shape=shape,
        layers=cfg.num_hidden_layers,
        dtype=str(dtype).removeprefix("torch."),
        seed=seed,
        shrink=shrink,
        max_shard_bytes=max_shard_bytes,
    )
    if is_complete(out, key):
        write_tokenizer(out, cfg.vocab_size)
        log(f"{out}: up to date")
        return json.loads((out / STAMP).read_text())
    clear(out)
    t0 = time.perf_counter()
    shards = plan_shards(specs, dtype, max_shard_bytes)
    files = shard_names(len(shards))
    for name, part in zip(files, shards):
        write_shard(out / name, part, dtype, seed)
        log(f"{out / name}: {_human(sum(nbytes(s, dtype) for s in part))}, {time.perf_counter() - t0:.1f} s")
    if len(files) > 1:
        write_index(out / "model.safetensors.index.json", shards, files, dtype)
    cfg.save_pretrained(out)
    GenerationConfig.from_model_config(cfg).save_pretrained(out)
    write_tokenizer(out, cfg.vocab_size)
    summary = {**key, **sizes(specs, dtype), "seconds": round(time.perf_counter() - t0, 1)}
    summary["files"] = {name: (out / name).stat().st_size for name in files}
    (out / STAMP).write_text(json.dumps(summary, indent=2) + "\n")  # last: marks the folder complete
    return summary


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """The demo model's tokenizer with a placeholder token `<rN>` for every id N it lacks, up to the real vocabulary
    size: a random-weight model's greedy tokens then decode to text, so that two runs' completions compare token for
    token (an id beyond the tokenizer would decode to nothing)."""
    tok = AutoTokenizer.from_pretrained(DEMO, local_files_only=True)
    tok.add_tokens([f"<r{i}>" for i in range(len(tok), vocab_size)])
    tok.save_pretrained(out)


def write_index(path: Path, shards: list[list[Spec]], files: list[str], dtype: torch.dtype) -> None:
    """The shard index as transformers writes it: total bytes and parameters, and each tensor's file."""
    specs = [s for part in shards for s in part]
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(s.shape) for s in specs),
            "total_size": sum(nbytes(s, dtype) for s in specs),
        },
        "weight_map": {s.name: name for name, part in zip(files, shards) for s in part},
    }
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def sizes(specs: list[Spec], dtype: torch.dtype) -> dict:
    """Bytes of the expert tensors and of everything else (attention, norms, routers, embedding, lm_head)."""
    experts = sum(nbytes(s, dtype) for s in specs if s.expert)
    return {"expert_bytes": experts, "dense_bytes": sum(nbytes(s, dtype) for s in specs) - experts}


def is_complete(out: Path, key: dict) -> bool:
    """Whether `out` holds the replica `key` describes: its stamp matches and every shard has its stamped size."""
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in key.items()) or not stamp.get("files"):
        return False
    return all((out / n).is_file() and (out / n).stat().st_size == size for n, size in stamp["files"].items())


def clear(out: Path) -> None:
    """Remove what an earlier replica left in `out` (stamp first), and only that: `out` may hold other files."""
    (out / STAMP).unlink(missing_ok=True)
    stale = [*out.glob("model*.safetensors"), *out.glob("model*.safetensors.*.tmp")]  # tmp: a killed writer's
    for path in [*stale, out / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)


def default_out(shape: str, layers: int, dtype: str, shrink: bool) -> Path:
    suffix = "-shrunk" if shrink else f"-{layers}l"
    return REPO / "runs" / "replicas" / f"{shape}{suffix}{'' if dtype == 'bfloat16' else '-' + dtype}"


def describe(shape: str, cfg: PreTrainedConfig, shrink: bool, dtype: torch.dtype) -> str:
    """One line: the layers kept and the bytes of experts and dense weights, kept and in the whole model."""
    s = SHAPES[shape]
    all_layers = {**s.values, **(s.shrink if shrink else {})}["num_hidden_layers"]
    kept = sizes(tensor_specs(shape, cfg), dtype)
    whole = sizes(tensor_specs(shape, replica_config(shape, all_layers, shrink, dtype)), dtype)
    gb = {k: _human(v) for k, v in kept.items()} | {"all_" + k: _human(v) for k, v in whole.items()}
    return (
        f"{shape}: {cfg.num_hidden_layers} of {all_layers} layers, {str(dtype).removeprefix('torch.')}: experts "
        f"{gb['expert_bytes']}, dense {gb['dense_bytes']} (all layers: experts {gb['all_expert_bytes']}, dense "
        f"{gb['all_dense_bytes']})"
    )


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="decoder layers to keep (default: 8 for OLMoE, 4 for Qwen3)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", action="store_true", help="tiny widths and 2 layers, same family and names (tests)")
    ap.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9)
    ap.add_argument("--out", type=Path, help="the model folder (default: runs/replicas/<shape>-<layers>l)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core generates as fast as the disk takes it; leave the others to the host
    dtype = DTYPES[args.dtype]
    cfg = replica_config(args.shape, args.layers, args.shrink, dtype)
    print(describe(args.shape, cfg, args.shrink, dtype), flush=True)
    out = args.out or default_out(args.shape, cfg.num_hidden_layers, args.dtype, args.shrink)
    shard_bytes = int(args.max_shard_gb * 1e9)
    log = lambda m: print(m, flush=True)  # noqa: E731
    summary = write_replica(args.shape, out, args.layers, dtype, args.seed, args.shrink, shard_bytes, log=log)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
