"""SiDA against the baselines, side by side on the same batches in one process (`make bench`; DESIGN.md §9).

Methods (every one classifies the same length-sorted batches of real task text):
- `resident`: the Hugging Face model with every expert in memory;
- `accelerate`: accelerate's own offload of the expert modules (`dispatch_model` with a device map: the
  budget's share of each layer's experts stays on the compute device, the rest on `disk` (CPU run, with an
  `offload_folder`) or `cpu` (GPU run); accelerate's hooks load an offloaded expert for each call);
- `lru`: sida's expert cache with no predictor (load on miss, evict least recently used: mixtral-offloading);
- `oracle`: `exact` with the router's own choices as the hash table (`--hash oracle`; built before the clock runs):
  the most prediction can win;
- `exact`: sida with the predictor prefetching by expected value (its top-k ranks per token weighed, k = 1 and 3,
  calibrated against the router); routing stays the router's;
- `predicted`: sida routing by the hash table; the router runs beside it (output unused) only to count hits.

Every number in a row is measured in that cell: wall time per batch, the cache's own counters (loads, bytes,
stalls, peak experts held), the labels. Nothing is carried over from another cell or assumed. A disk row also has
`min_bytes`, what Belady's rule with the true future would read at its budget over the experts the cell used
(`min_bytes.py`), and may run with the expert reads paced to a set rate (`read_limit_bytes_per_s`, a disk of
known speed; null: the disk as it is).

    .venv/bin/python bench/offload_bench.py --preset cpu --out bench/results/cpu.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.min_bytes import belady_reads  # noqa: E402
from sida.offload.engine import OffloadConfig, OffloadEngine  # noqa: E402
from sida.offload.hash_table import rank_depth  # noqa: E402
from sida.offload.model_loader import LoadedModel, load_model  # noqa: E402
from sida.offload.runner import Runner  # noqa: E402
from sida.offload.tasks import Task, get_task  # noqa: E402

DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "models" / "sida-switch-demo"
# MultiRC ships no dev split here: its test split is unlabelled, so its rows have throughput but no accuracy
TASK_FILES = {"sst2": "sst2/dev.tsv", "mrpc": "mrpc/dev.tsv", "multirc": "multirc/test.jsonl"}
BUDGETS = (0.10, 0.25, 0.50, 1.00)
# (method, prefetch_k): the columns of the matrix
METHODS = (
    ("resident", None),
    ("accelerate", None),
    ("lru", None),
    ("layered", None),
    ("oracle", 1),
    ("exact", 1),
    ("exact", 3),
    ("predicted", None),
)


@dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]  # "demo" or "switch-base-N"
    tasks: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    limit: dict  # model → examples per task (None: the whole dev set)
    budgets: tuple[float, ...] = BUDGETS
    predictor_traces: int = 2000  # SST-2 train sentences traced to train a random-weight model's predictor
    predictor_epochs: int = 4
    tier: str = "ram"  # where sida's methods keep the experts: "ram", or "disk" (read with O_DIRECT)
    methods: tuple[str, ...] = ("resident", "accelerate", "lru", "exact", "predicted")
    sida_policy: str = "lru"  # the eviction policy of `exact` and `predicted` (`lru` and `layered` are their own)
    read_limits: tuple[float | None, ...] = (None,)  # disk rows: unpaced (None), then paced to each rate
    paced_budgets: tuple[float, ...] = ()  # the budgets whose disk rows also run paced


PRESETS = {
    # ≤ 15 minutes on 2 CPU cores (the development and CI machines)
    "cpu": Preset(
        ("demo", "switch-base-8"),
        ("sst2",),
        (32,),
        ("float32",),
        {"demo": None, "switch-base-8": 256},
        predictor_traces=6000,
        predictor_epochs=16,
    ),
    # experts on disk, a budget of them in RAM: every miss is a disk read, the page cache out of the way
    "cpu-disk": Preset(
        ("demo", "switch-base-8"),
        ("sst2",),
        (1, 8, 32),
        ("float32",),
        {"demo": 128, "switch-base-8": 64},
        budgets=(0.10, 0.25, 0.50),
        predictor_traces=6000,
        predictor_epochs=16,
        tier="disk",
        methods=("resident", "accelerate", "lru", "layered", "oracle", "exact", "predicted"),
        sida_policy="layered",
        read_limits=(None, 1e9),
        paced_budgets=(0.25,),
    ),
    # a GPU box: run it in chunks (--models/--batch-sizes/--dtypes) of under 10 minutes each
    "gpu": Preset(
        ("demo", "switch-base-64", "switch-base-128", "switch-base-256"),
        ("sst2", "mrpc", "multirc"),
        (1, 32),
        ("float16", "bfloat16"),
        {"demo": None, "switch-base-64": 512, "switch-base-128": 512, "switch-base-256": 512},
        budgets=(0.1, 0.2, 0.25, 0.5, 1.0),  # at 20% the experts exceed the budget five times over
        predictor_traces=4000,
        predictor_epochs=6,
    ),
}


# ------------------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    name: str  # the model's row label: the demo folder's name or switch-base-N
    loaded: LoadedModel  # pristine: every cell runs on a deep copy (offload replaces the MoE layers)
    task: Task
    batches: list[dict]  # encoded batches, length-sorted as `sida eval` does
    labels: list[list[str]] | None
    predictor: object | None  # HashPredictor
    predictor_info: dict
    decoder_guess: object | None  # DecoderGuess: decoder layers' per-step guesses
    tier: str = "ram"
    expert_dir: Path | None = None  # tier disk: where the cells' shared expert file is written (once)
    sida_policy: str = "lru"

    @property
    def examples(self) -> int:
        return sum(b["input_ids"].shape[0] for b in self.batches)

    @property
    def real_tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)


def load_workload(
    model: str, task_name: str, batch_size: int, dtype: str, device: torch.device, preset: Preset, log
) -> Workload:
    from sida.predictor.artifact import find_predictor, load_predictor
    from sida.predictor.decoder_guess import DecoderGuess

    # the pristine model stays on the host; each cell moves its own copy to the device
    if model == "demo":
        loaded = load_model(DEMO, dtype)
        pred, meta = load_predictor(find_predictor(DEMO), loaded.fingerprint)
        guess = DecoderGuess.load(find_predictor(DEMO), loaded.fingerprint)
        info = {"source": "shipped", "val": meta.get("training", {}).get("val", {})}
        name = loaded.name
    else:
        loaded = random_switch(int(model.rsplit("-", 1)[1]), dtype)
        pred, guess, info = quick_predictor(loaded, preset, log)
        name = model
    task = get_task(task_name)
    examples = task.read(DATA / TASK_FILES[task_name], preset.limit.get(model))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    runner = Runner(loaded, str(device))
    batches, labels = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batches.append(runner.encode([examples[i].prompt for i in idx]))
        labels.append([examples[i].label for i in idx])
    has_labels = all(e.label is not None for e in examples)
    expert_dir = None
    if preset.tier == "disk":  # on the project's disk (not /tmp, which may be RAM): reads must hit a disk
        (REPO / "runs").mkdir(exist_ok=True)
        expert_dir = Path(tempfile.mkdtemp(prefix="sida-bench-experts-", dir=REPO / "runs"))
    labels = labels if has_labels else None
    return Workload(
        name, loaded, task, batches, labels, pred.to(device), info, guess, preset.tier, expert_dir, preset.sida_policy
    )


def random_switch(num_experts: int, dtype: str) -> LoadedModel:
    """switch-base-N with random weights (seed 0) and the demo model's tokenizer (its ids fit the vocabulary)."""
    from bench.switch_shapes import switch_base_model
    from sida.offload.adapters import SwitchAdapter

    torch.manual_seed(0)
    model = switch_base_model(num_experts, "cpu", getattr(torch, dtype))
    tokenizer = load_model(DEMO).tokenizer
    return LoadedModel(
        model, tokenizer, SwitchAdapter(), model.config, Path(f"switch-base-{num_experts}"), f"random-{num_experts}-0"
    )


def predictor_inputs(limit: int) -> list[str]:
    """The first `limit` SST-2 train sentences as the model sees them (each in the task's prompt, once)."""
    return [e.prompt for e in get_task("sst2").read(DATA / "sst2" / "train.tsv", limit)]


PREDICTOR_CACHE = REPO / "runs" / "bench-predictors"  # trained once per model, dtype and recipe


def quick_predictor(loaded: LoadedModel, preset: Preset, log):
    """Train a predictor on this model's own router traces (SST-2 train), so its hit rates are real, early-stopped
    when its validation top-1 stops rising; the decoder table from the first decoder step of a quarter of those
    sentences. Kept under runs/ and reused by later runs (and presets) with the same recipe."""
    from sida.predictor.artifact import load_predictor, save_predictor
    from sida.predictor.cli import tracing_progress
    from sida.predictor.decoder_guess import DecoderGuess, PrevTokenTable, decoder_routes
    from sida.predictor.traces import classification_batches, collect_traces
    from sida.predictor.train import TrainConfig, train

    dtype = str(loaded.model.dtype).removeprefix("torch.")
    folder = PREDICTOR_CACHE / f"{loaded.name}-{dtype}-{preset.predictor_traces}x{preset.predictor_epochs}"
    if (folder / "predictor.json").is_file() and (folder / DecoderGuess.FILE).is_file():
        pred, meta = load_predictor(folder, loaded.fingerprint)
        info = {k: meta[k] for k in ("source", "val", "seconds", "epochs")}
        return pred, DecoderGuess.load(folder, loaded.fingerprint), {**info, "cached": str(folder.relative_to(REPO))}
    t0 = time.perf_counter()
    texts = predictor_inputs(preset.predictor_traces)
    table = PrevTokenTable(loaded.config.vocab_size, loaded.adapter.num_experts(loaded.model))
    table.fit(decoder_routes(loaded, classification_batches(Runner(loaded), texts[: len(texts) // 4], 32)))
    traces = collect_traces(loaded, texts, batch_size=32, progress=tracing_progress(f"tracing {loaded.name}"))
    emb = loaded.adapter.embeddings(loaded.model).weight.detach().float()
    cfg = TrainConfig(max_epochs=preset.predictor_epochs, patience=2)
    pred, report = train(traces, emb, loaded.adapter.num_experts(loaded.model), cfg, log=log)
    epochs = len(report["history"])
    info = {
        "source": f"trained here on {len(texts)} SST-2 train sentences, {epochs} epochs (validation top-1 stopped "
        f"rising, or the cap of {cfg.max_epochs})",
        "val": report["val"],
        "seconds": round(time.perf_counter() - t0, 1),
        "epochs": epochs,
    }
    guess = DecoderGuess.from_table(table)
    save_predictor(pred, folder, loaded.fingerprint, info)
    guess.save(folder, loaded.fingerprint, {})
    log(json.dumps({"predictor": loaded.name, **info["val"]}))
    return pred, guess, info


# ------------------------------------------------------------------------------------------ one cell


def budget_experts(total: int, fraction: float) -> int:
    return max(1, round(total * fraction))


class AccelerateOffload:
    """Expert modules offloaded by accelerate's `dispatch_model`; counts the loads its hooks make."""

    def __init__(self, loaded: LoadedModel, fraction: float, device: torch.device, folder: Path, uncached=False):
        from accelerate import dispatch_model

        layers = loaded.adapter.moe_layers(loaded.model)
        experts = loaded.adapter.num_experts(loaded.model)
        keep = budget_experts(len(layers) * experts, fraction)
        per_layer = [keep // len(layers) + (1 if i < keep % len(layers) else 0) for i in range(len(layers))]
        offload_to = "disk" if device.type == "cpu" else "cpu"
        device_map = {"": str(device) if device.type == "cpu" else device.index or 0}
        self.offloaded = []
        for la, n in zip(layers, per_layer):
            for e in range(n, experts):
                name = f"{la.name}.experts.expert_{e}"
                device_map[name] = offload_to
                self.offloaded.append(name)
        self.expert_bytes = sum(p.numel() * p.element_size() for p in layers[0].experts[0].parameters())
        self.all_experts = [m for la in layers for m in la.experts]
        self.resident = len(self.all_experts) - len(self.offloaded)
        kwargs = {"offload_dir": str(folder)} if offload_to == "disk" else {}
        self.model = dispatch_model(loaded.model, device_map=device_map, main_device=str(device), **kwargs)
        self.loads = 0
        self.peak_bytes = self.resident * self.expert_bytes
        for name in self.offloaded:
            expert = self.model.get_submodule(name)
            expert.register_forward_pre_hook(self._on_load)
            expert.wi.register_forward_pre_hook(self._held)  # runs while accelerate has the expert loaded
            if offload_to == "disk" and uncached:  # its files leave the page cache: the next call reads the disk
                files = sorted(folder.glob(f"{name}.*.dat"))
                expert.register_forward_hook(lambda *_, files=files: _drop_from_page_cache(files))

    def _on_load(self, *_):
        self.loads += 1

    def _held(self, *_):
        held = sum(p.numel() * p.element_size() for m in self.all_experts for p in m.parameters() if not p.is_meta)
        self.peak_bytes = max(self.peak_bytes, held)

    def reset(self) -> None:
        self.loads = 0


def _drop_from_page_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_read_bytes() -> int:
    """Bytes this process has read from block devices (not from the page cache), per /proc/self/io."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def run_cell(
    work: Workload,
    method: str,
    fraction: float,
    k: int | None,
    device: torch.device,
    resident_preds=None,
    read_limit: float | None = None,
):
    """One method at one budget over all of the workload's batches (expert reads paced to `read_limit` bytes/s
    where given); returns the row (figures of this cell only)."""
    model = copy.deepcopy(work.loaded.model)
    if method != "accelerate":  # accelerate places the modules itself, offloaded experts never reach the device
        model = model.to(device)
    loaded = dataclasses.replace(work.loaded, model=model)
    total = len(loaded.adapter.moe_layers(loaded.model)) * loaded.adapter.num_experts(loaded.model)
    hash_time = [0.0]
    engine = acc = hash_fn = None
    folder = None
    if method == "accelerate":
        folder = tempfile.TemporaryDirectory(prefix="sida-bench-offload-")
        acc = AccelerateOffload(loaded, fraction, device, Path(folder.name), uncached=work.tier == "disk")
        runner = Runner(loaded, str(device), 10**6)
    else:
        from sida.predictor.network import PredictorHash

        mode = "exact" if method in ("lru", "layered", "oracle") else method
        policies = {"lru": "lru", "layered": "layered"}  # the baselines' policies; sida's methods use the preset's
        cfg = OffloadConfig(
            mode=mode,
            policy=policies.get(method, work.sida_policy),
            budget_experts=budget_experts(total, fraction),
            prefetch_k=k or 1,
            tier="ram" if method == "resident" else work.tier,
            expert_dir=work.expert_dir,
            read_limit_bytes_per_s=read_limit,
        )
        engine = OffloadEngine(loaded, cfg, device)
        if method == "oracle":
            hash_fn = oracle_tables(work)
        if method in ("exact", "predicted"):
            table = PredictorHash(work.predictor, k=rank_depth(k or 1))

            def hash_fn(*args):
                t0 = time.perf_counter()
                out = table(*args)
                hash_time[0] += time.perf_counter() - t0
                return out

            if work.decoder_guess is not None:
                engine.set_decoder_guess(work.decoder_guess)
        runner = Runner(loaded, str(device), 10**6, engine, hash_fn)
    shadow = method == "predicted"  # predicted mode also runs the router, to count hits against its real choice

    def classify(batch):
        labels = [c.label for c in runner.classify_ids(batch, work.task, runner.build_hash_table(batch), shadow)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return labels

    classify(work.batches[0])  # warm-up: first-call costs and a first fill, not counted
    if engine is not None:
        engine.reset_stats()
    if acc is not None:
        acc.reset()
    hash_time[0] = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    accesses = record_accesses(engine)
    times, preds = [], []
    read0 = device_read_bytes()
    for batch in work.batches:
        t0 = time.perf_counter()
        preds.append(classify(batch))
        times.append(time.perf_counter() - t0)
    row = _row(work, method, fraction, k, engine, acc, times, preds, hash_time[0], device, resident_preds, total)
    row["bytes_read"] = device_read_bytes() - read0
    row["read_limit_bytes_per_s"] = read_limit
    row["min_bytes"] = None
    if accesses is not None and method != "resident":
        row["min_bytes"] = belady_reads(accesses, engine.num_slots) * engine.expert_bytes
    row["_accesses"] = accesses
    # this cell's model copy, its hooks and its expert store must go before the next cell makes its own
    if engine is not None:
        engine.close()  # the disk tier's I/O threads and file descriptors
    runner = engine = acc = loaded = model = hash_fn = None
    gc.collect()
    if folder is not None:
        folder.cleanup()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def oracle_tables(work: Workload):
    """A hash function that returns, for each of the workload's batches, the router's own choices (`--hash oracle`),
    computed now, before the clock runs: the oracle row measures what prediction can win, not what the oracle
    costs (a whole resident forward per batch)."""
    from sida.predictor.oracle import OracleHash

    oracle = OracleHash(work.loaded, k=rank_depth(1))
    tables = {}
    for batch in work.batches:
        start = work.loaded.decoder_start_ids(batch["input_ids"].shape[0], torch.device("cpu"))
        tables[batch["input_ids"].data_ptr()] = oracle(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), start)

    def hash_fn(input_ids, attention_mask, decoder_input_ids=None):
        return tables[input_ids.data_ptr()]

    return hash_fn


def record_accesses(engine: OffloadEngine | None) -> list | None:
    """The experts the cell's layers acquire from now on, in order (for `min_bytes`); None without a cache."""
    if engine is None or engine.cache is None:
        return None
    accesses: list = []
    acquire = engine.cache.acquire

    def recording(keys):
        accesses.extend(keys)
        return acquire(keys)

    engine.cache.acquire = recording
    return accesses


def _row(work, method, fraction, k, engine, acc, times, preds, hash_seconds, device, resident_preds, total) -> dict:
    seconds = sum(times)
    ms = sorted(t * 1e3 for t in times)
    row = {
        "method": method,
        "tier": "ram" if method == "resident" else work.tier,
        "policy": None if engine is None or engine.cache is None else engine.cfg.policy,
        "model": work.name,
        "task": work.task.name,
        "dtype": str(work.loaded.model.dtype).removeprefix("torch."),
        "batch_size": work.batches[0]["input_ids"].shape[0],
        "budget_fraction": fraction,
        "prefetch_k": k,
        "budget_experts": None if method == "resident" else budget_experts(total, fraction),
        "total_experts": total,
        "examples": work.examples,
        "seq_per_s": round(work.examples / seconds, 3),
        "tokens_per_s": round(work.real_tokens / seconds, 1),
        "p50_ms": round(_percentile(ms, 50), 3),
        "p99_ms": round(_percentile(ms, 99), 3),
        "hash_seconds": round(hash_seconds, 4),
        "batch_ms": [round(t * 1e3, 3) for t in times],
    }
    if engine is not None:
        s = engine.summary()
        row.update(
            expert_bytes=s["expert_bytes"],
            budget_bytes=None if engine.cache is None else engine.cache.budget_bytes,
            peak_expert_bytes=s["peak_resident_experts"] * s["expert_bytes"],
            bytes_moved=s["expert_bytes_moved"],
            on_demand_loads=s["on_demand_loads"],
            prefetch_loads=s.get("prefetch_loads", 0),
            expert_uses=s.get("expert_lookups"),
            hit_rate=s["cache_hit_rate"],
            stall_seconds=s["stall_seconds"],
            stall_share=round(s["stall_seconds"] / seconds, 4),
            prefetch_precision=s.get("prefetch_precision"),
            prefetch_used_bytes=s.get("prefetch_used_bytes"),
            prefetch_unused_bytes=s.get("prefetch_unused_bytes"),
            prefetch_cancelled=s.get("prefetch_cancelled"),
            stall_seconds_by_layer=s.get("stall_seconds_by_layer"),
            hash_hit_rate=s.get("hash_hit_rate"),
            decoder_hash_hit_rate=s.get("decoder_hash_hit_rate"),
        )
        if method == "resident":
            row.update(expert_uses=None, hit_rate=None)
    else:
        row.update(  # the hooks see only offloaded experts' calls: every one is a load the forward waits for
            expert_bytes=acc.expert_bytes,
            budget_bytes=acc.resident * acc.expert_bytes,
            peak_expert_bytes=acc.peak_bytes,
            bytes_moved=acc.loads * acc.expert_bytes,
            on_demand_loads=acc.loads,
            prefetch_loads=0,
            expert_uses=None,
            hit_rate=None,
            stall_seconds=None,  # accelerate loads inside its modules' own forward: not separable from compute
            stall_share=None,
            prefetch_precision=None,
            hash_hit_rate=None,
            decoder_hash_hit_rate=None,
            offloaded_experts=len(acc.offloaded),
        )
    if device.type == "cuda":
        row["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    flat = [p for batch in preds for p in batch]
    row["accuracy"] = None
    if work.labels is not None:
        truth = [x for batch in work.labels for x in batch]
        row["accuracy"] = round(sum(p == t for p, t in zip(flat, truth)) / len(truth), 6)
    row["agreement_with_resident"] = (
        None if resident_preds is None else round(sum(a == b for a, b in zip(flat, resident_preds)) / len(flat), 6)
    )
    row["_predictions"] = flat
    return row


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    i = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[i]


# ------------------------------------------------------------------------------------------ GPU copy bandwidth


def copy_bandwidth(device: torch.device, expert_bytes: int, large_bytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Host-to-device GB/s from pinned and from pageable memory: one expert's size and one large copy."""
    out = {}
    for label, size in (("expert", expert_bytes), ("large", large_bytes)):
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        for kind in ("pinned", "pageable"):
            src = torch.empty(size, dtype=torch.uint8, pin_memory=kind == "pinned")
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            out[f"{kind}_{label}_gbps"] = round(size * repeats / (time.perf_counter() - t0) / 1e9, 2)
    return out


# ------------------------------------------------------------------------------------------ driver


def header(args, device: torch.device) -> dict:
    import transformers

    try:
        import accelerate

        acc_version = accelerate.__version__
    except ImportError:
        acc_version = None
    head = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": acc_version,
        },
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return head


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        name = platform.processor() or "unknown"
    return f"{name}, {os.cpu_count()} cores"


def run(args, log=print) -> dict:
    preset = PRESETS[args.preset]
    if args.limit:
        preset = dataclasses.replace(preset, limit={m: args.limit for m in preset.models})
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    models = args.models or preset.models
    methods = [m for m in METHODS if (not args.methods or m[0] in args.methods)]
    methods = [m for m in methods if m[0] in preset.methods]
    budgets = args.budgets or preset.budgets
    if args.read_limits:
        preset = dataclasses.replace(preset, read_limits=tuple(args.read_limits))
    result = {"header": header(args, device), "rows": [], "predictors": {}}
    if device.type == "cuda":
        result["header"]["bandwidth"] = copy_bandwidth(device, expert_bytes=2 * 768 * 3072 * 4)
    workloads = list(
        itertools.product(
            models, args.dtypes or preset.dtypes, args.tasks or preset.tasks, args.batch_sizes or preset.batch_sizes
        )
    )
    plan = cells(preset, methods, budgets, preset.tier)
    # a bar on a terminal (which cell, how far, how long left); nothing in a CI log, where the JSON lines say it all
    progress = tqdm(total=len(workloads) * len(plan), desc="bench", unit="cell", disable=None, file=sys.stderr)
    for model, dtype, task, bs in workloads:
        work = load_workload(model, task, bs, dtype, device, preset, log)
        result["predictors"][f"{work.name}/{dtype}"] = work.predictor_info
        resident_preds, rows = None, []
        for method, k, fraction, limit in plan:
            progress.set_postfix_str(f"{model} b{bs} {method} {fraction:g}" + (f" paced {limit:g}" if limit else ""))
            t0 = time.perf_counter()
            row = run_cell(work, method, fraction, k, device, resident_preds, limit)
            preds = row.pop("_predictions")
            if method == "resident":
                resident_preds = preds
            rows.append(row)
            progress.update()
            log(json.dumps({**_brief(row), "cell_seconds": round(time.perf_counter() - t0, 1)}))
        result["rows"] += fill_min_bytes(rows)
        if work.expert_dir is not None:
            shutil.rmtree(work.expert_dir, ignore_errors=True)
        del work
    progress.close()
    return result


def cells(preset: Preset, methods, budgets, tier: str) -> list[tuple]:
    """(method, k, budget, read limit) of every cell of one workload, in order: a disk workload's cells at a budget of
    `paced_budgets` run again with the reads paced to each of `read_limits` (accelerate reads through its own files:
    never paced)."""
    out = []
    for method, k in methods:
        for fraction in (1.0,) if method == "resident" else budgets:
            for limit in preset.read_limits if tier == "disk" else (None,):
                paced = limit is not None
                if paced and (method in ("resident", "accelerate") or fraction not in preset.paced_budgets):
                    continue
                out.append((method, k, fraction, limit))
    return out


def fill_min_bytes(rows: list[dict]) -> list[dict]:
    """`min_bytes` of accelerate's rows, from the lru row at the same budget (the router routes both: the same
    experts in the same order); then the rows without their access lists, each disk row with bytes ÷ min_bytes."""
    floors = {r["budget_fraction"]: r["min_bytes"] for r in rows if r["method"] == "lru" and r["min_bytes"]}
    for row in rows:
        row.pop("_accesses", None)
        if row["method"] == "accelerate":
            row["min_bytes"] = floors.get(row["budget_fraction"])
        row["bytes_over_min"] = None
        if row["tier"] == "disk" and row["min_bytes"]:
            row["bytes_over_min"] = round(row["bytes_moved"] / row["min_bytes"], 4)
    return rows


def _brief(row: dict) -> dict:
    keys = ("method", "model", "budget_fraction", "prefetch_k", "read_limit_bytes_per_s", "seq_per_s", "hit_rate")
    return {k: row[k] for k in keys}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, help="JSON file; with --append, rows are added to those already there")
    p.add_argument("--append", action="store_true", help="add to --out (GPU chunks) instead of replacing it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--models", nargs="+", help="subset of the preset's models (demo, switch-base-N)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASK_FILES))
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budgets", nargs="+", type=float)
    p.add_argument("--methods", nargs="+", choices=sorted({m for m, _ in METHODS}))
    p.add_argument("--limit", type=int, help="examples per task for every model (default: the preset's)")
    p.add_argument(
        "--read-limits",
        nargs="+",
        type=lambda v: None if v.lower() == "none" else float(v),
        help="disk rows: 'none' (the disk as it is) and/or rates in bytes/s to pace expert reads to "
        "(default: the preset's; paced at the preset's paced budgets)",
    )
    args = p.parse_args(argv)
    result = run(args, log=lambda m: tqdm.write(m, file=sys.stderr))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.out.is_file():
            old = json.loads(args.out.read_text())
            result["rows"] = old["rows"] + result["rows"]
            result["predictors"] = {**old.get("predictors", {}), **result["predictors"]}
            result["header"]["chunks"] = old["header"].get("chunks", [old["header"]["command"]]) + [
                result["header"]["command"]
            ]
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"rows": len(result["rows"]), "out": str(args.out) if args.out else None}))


if __name__ == "__main__":
    main()
