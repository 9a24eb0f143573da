"""Puts a loaded model under offload: experts move to an ExpertStore, a budgeted DeviceExpertCache serves them,
and every sparse MLP is replaced by a SiDA MoE layer. `resident` leaves the Hugging Face model untouched.

Every byte the engine places on the device is on its `DeviceMemory` account: the dense weights (measured from
the module tree) and the expert slots. A model loaded with `experts="host"` has its experts read from the
checkpoint straight into the host store, so they reach the device only through the slots.

Per batch, the runner calls `begin_batch` (the batch's hash table and routing state) and, for every later
decoder step, `begin_decoder_step` (the tokens that step reads), so each layer finds its predictions ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sida.offload.budget import AUTO_RESERVE, BudgetDecision, auto_budget, explicit_budget
from sida.offload.contracts import DecodeStepGuesser, LayerAheadScorer
from sida.offload.device_cache import CacheStats, DeviceExpertCache
from sida.offload.expert_execution import ExpertExecutor
from sida.offload.expert_file import IO_MODES
from sida.offload.expert_layout import ModuleExperts
from sida.offload.expert_store import ExpertStore
from sida.offload.hash_table import HashTable, rank_depth
from sida.offload.io_queue import RateLimit
from sida.offload.lookahead import RouterAhead, RouterScorer
from sida.offload.memory import DeviceMemory, PeakMemory, tensor_bytes
from sida.offload.model_loader import LoadedModel
from sida.offload.moe_layer import NextLayerExperts, RoutingContext, RoutingStats
from sida.offload.policies import StaticHotSetPolicy, hot_set, make_policy
from sida.offload.transfer import Transfer

MODES = ("resident", "exact", "predicted")

log = logging.getLogger("sida")


@dataclass(frozen=True)
class OffloadConfig:
    """How a model is offloaded: routing mode, the device budget, eviction policy, host tier and prefetch depth."""

    mode: str = "resident"
    budget_experts: int | None = None  # slots for all MoE layers together; wins over `budget`
    budget_bytes: int | None = None  # alternative to budget_experts
    budget: str = "half"  # neither given: "half" of all experts, or "auto" (what the device has free, measured)
    policy: str = "lru"
    tier: str = "ram"
    prefetch_k: int = 1  # ranks of each token's guesses weighed when choosing what to load ahead
    expert_dir: Path | None = None  # where tier 'disk' keeps its expert file
    disk_io: str = "direct"  # tier 'disk' reads: "direct" (O_DIRECT) or "dontneed" (page cache, dropped after)
    read_limit_bytes_per_s: float | None = None  # tier 'disk': expert reads paced to this rate (a disk of known speed)
    device_memory_limit: int | None = None  # bytes the engine may place on the device (None: what it has)
    max_batch: int = 32  # the largest batch (sequences × tokens) budget "auto" keeps activation room for
    max_tokens: int = 512


class OffloadEngine:
    """A loaded model with its experts behind a budgeted device cache (or untouched, in `resident` mode)."""

    def __init__(self, loaded: LoadedModel, cfg: OffloadConfig, device: torch.device):
        _check(cfg)
        self.cfg = cfg
        self.loaded = loaded
        self.device = device
        model, adapter = loaded.model, loaded.adapter
        layers = adapter.moe_layers(model)
        self.num_layers = len(layers)
        self.num_experts = adapter.num_experts(model)
        self.total_experts = self.num_layers * self.num_experts
        self.context = RoutingContext(
            mode=cfg.mode,
            prefetch_k=cfg.prefetch_k,
            causal=not adapter.is_encoder_decoder,
            routes=int(getattr(model.config, "num_experts_per_tok", 1) or 1),
            num_experts=self.num_experts,
            encoder_layers=frozenset(la.index for la in layers if la.stack == "encoder"),
        )
        self.routing_stats = RoutingStats()
        self.cache: DeviceExpertCache | None = None
        self.executor: ExpertExecutor | None = None  # runs every offloaded layer's experts from the cache
        self.first_layer_stack = layers[0].stack
        self.layer_stack = {la.index: la.stack for la in layers}
        self.decoder_layers = [la.index for la in layers if la.stack == "decoder"]
        self.decoder_guess: DecodeStepGuesser | None = None  # each decoder step's experts, by its input
        self._encoder_first: torch.Tensor | None = None  # [batch] each row's first input token: keys first steps
        self.memory = DeviceMemory(device, cfg.device_memory_limit)
        in_experts = tensor_bytes(p for la in layers for m in la.experts for p in m.parameters())
        self.memory.place("dense", tensor_bytes([*model.parameters(), *model.buffers()]) - in_experts)
        if cfg.mode == "resident":
            if loaded.experts is not None:
                raise ValueError("resident mode needs the experts in the model: load it with experts='device'")
            self.memory.place("experts", in_experts)
            self.expert_bytes = in_experts // self.total_experts
            self.num_slots = self.total_experts
            self.budget = BudgetDecision(self.total_experts, "resident", "every expert, in the model")
            return
        store = self._build_store(layers)
        self.expert_bytes = store.expert_bytes
        decision = explicit_budget(
            cfg.budget, cfg.budget_experts, cfg.budget_bytes, store.expert_bytes, self.total_experts
        )
        transfer = Transfer(device, store.layout.numel, store.layout.dtype)
        if store.tier == "disk":  # reader threads and pinned staging at start-up, not on the first request
            transfer.start_io(store.read_bytes)
        slots = decision.slots if decision is not None else 1
        self.cache = DeviceExpertCache(store, slots, make_policy(cfg.policy), device, transfer, self.memory)
        self._replace_layers(layers)
        del layers  # with them go the original sparse MLPs and, for a whole-loaded model, its expert weights
        self.budget = decision if decision is not None else self._auto_budget()
        self.cache.grow(self.budget.slots - self.cache.num_slots)
        self.num_slots = self.cache.num_slots
        log.info(
            "%s: %d MoE layers × %d experts of %d bytes; expert budget: %s",
            adapter.family, self.num_layers, self.num_experts, self.expert_bytes, self.budget.reason,
        )  # fmt: skip

    def _build_store(self, layers) -> ExpertStore:
        """Every expert in the host tier: from the checkpoint when the model was loaded without them, else copied
        out of the model's modules."""
        cfg, loaded = self.cfg, self.loaded
        disk_path = None
        if cfg.tier == "disk":
            root = cfg.expert_dir or Path.home() / ".cache" / "sida" / "experts"
            dtype = str(loaded.model.dtype).removeprefix("torch.")
            disk_path = Path(root) / f"{loaded.fingerprint}-{dtype}.safetensors"
        pin = self.device.type == "cuda" and cfg.tier == "ram"
        source = loaded.experts
        if source is None:
            source = ModuleExperts(((la.index, e), module) for la in layers for e, module in enumerate(la.experts))
        store = ExpertStore.build(source, cfg.tier, pin, disk_path, loaded.fingerprint, cfg.disk_io)
        if cfg.read_limit_bytes_per_s is not None and store.tier == "disk":
            store.read_limit = RateLimit(cfg.read_limit_bytes_per_s)
        return store

    def _auto_budget(self) -> BudgetDecision:
        """Budget "auto": every expert for the ram tier on CPU (the host holds them all already); else what the
        device has free once the activations of the largest batch, measured by one warm-up forward, are kept."""
        if self.device.type == "cpu" and self.cfg.tier == "ram":
            slots = self.total_experts
            if self.memory.limit is not None:
                slots = max(1, min(slots, self.cache.num_slots + self.memory.free_bytes() // self.expert_bytes))
            return BudgetDecision(slots, "auto", f"{slots} of {self.total_experts} experts: tier ram on CPU")
        headroom = self._warmup()
        free = self.memory.free_bytes(reserve=AUTO_RESERVE)
        return auto_budget(free, headroom, self.expert_bytes, self.total_experts, self.cache.num_slots)

    def _warmup(self) -> int:
        """Peak activation bytes of one forward at the largest batch (max_batch × max_tokens), routed by the
        router, with the slots allocated so far."""
        b, s = self.cfg.max_batch, self.cfg.max_tokens
        ids = torch.zeros(b, s, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        start = self.loaded.decoder_start_ids(b, self.device)
        extra = {} if start is None else {"decoder_input_ids": start}
        mode, self.context.mode = self.context.mode, "exact"  # the router routes it: no hash table is needed
        try:
            self.begin_batch(mask)
            with torch.inference_mode(), PeakMemory(self.device) as peak:
                self.loaded.model(input_ids=ids, attention_mask=mask, **extra)
        finally:
            self.context.mode = mode
        self.reset_stats()
        return peak.bytes

    def _replace_layers(self, layers) -> None:
        """Every MoE layer runs its experts through one `ExpertExecutor` (the adapter puts it in place), which loads
        the next MoE layer's experts while a layer computes. After the last decoder layer comes the first decoder
        layer of the next step."""
        model, adapter = self.loaded.model, self.loaded.adapter
        decoder_first = self.decoder_layers[0] if self.decoder_layers else None
        following = {}  # layer → (the MoE layer after it, its stack)
        for i, la in enumerate(layers):
            if i + 1 < len(layers):
                nxt = layers[i + 1]
            else:
                nxt = layers[decoder_first] if la.stack == "decoder" else None
            if nxt is not None:
                following[la.index] = (nxt.index, nxt.stack)
        next_keys = NextLayerExperts(self.context, following)
        self.executor = ExpertExecutor(self.cache, adapter.expert_forward(model), self.num_experts, next_keys)
        adapter.attach(model, layers, self.executor, self.context, self.routing_stats)
        if self.context.causal:  # decode steps: each layer's experts guessed from the layer before (lookahead.py)
            within_step = {layer: nxt for layer, (nxt, _) in following.items() if nxt > layer}
            scorer = RouterScorer({la.index: la.router for la in layers})
            embeddings = model.get_input_embeddings()
            self.context.lookahead = RouterAhead(scorer, within_step, embeddings, self.context.routes)

    def set_lookahead_scorer(self, scorer: LayerAheadScorer) -> None:
        """Guess decode steps with `scorer` (the trained decode-step predictor) instead of the routers ahead."""
        if self.context.lookahead is None:
            raise ValueError("decode-step guesses are for decoder-only models")
        self.context.lookahead.scorer = scorer

    def keep_hot(self, counts: dict, on_demand_slots: int) -> list:
        """The static hot-set method (policy `static`): the experts most used in `counts` ((layer, expert) → uses
        in traces) fill every slot but `on_demand_slots`, are loaded now and stay; returns the hot keys."""
        if self.cache is None or not isinstance(self.cache.policy, StaticHotSetPolicy):
            raise ValueError("keep_hot needs an offloaded engine with policy 'static'")
        hot = hot_set(counts, self.num_slots - on_demand_slots)
        self.cache.policy.hot = set(hot)
        self.cache.prefetch(hot)
        return hot

    def set_decoder_guess(self, guess: DecodeStepGuesser) -> None:
        """Use `guess` to prefetch and score each decoder step's experts."""
        missing = set(self.decoder_layers) - set(guess.layers)
        if missing:
            raise ValueError(f"the decoder guess has no rows for decoder MoE layers {sorted(missing)}")
        self.decoder_guess = guess.to(self.device)

    @property
    def wants_hash_table(self) -> bool:
        """Whether a batch's hash table would change anything: `predicted` routes by it; `exact` prefetches with it,
        which pays only where experts get evicted. With a budget that holds every expert, nothing is ever evicted:
        each expert is loaded once, on its first use, and hashing every batch would be pure overhead."""
        if self.cfg.mode == "predicted":
            return True
        return self.cache is not None and self.num_slots < self.total_experts

    def begin_batch(
        self,
        token_mask: torch.Tensor | None = None,
        hash_table: HashTable | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_first: torch.Tensor | None = None,
        shadow: bool = False,
    ) -> None:
        """Set a batch's routing state and start loading the first MoE layer's predicted experts.

        token_mask [batch, enc_seq]: the encoder's real tokens. decoder_input_ids [batch, steps]: the decoder's
        first inputs (guessed now, so the last encoder layer can prefetch for the decoder). encoder_first
        [batch]: each row's first input token, which keys the decoder guess of the first step. shadow: in
        `predicted` mode, also run the router to count live hits."""
        ctx = self.context
        if ctx.mode == "predicted" and hash_table is None:
            raise ValueError("predicted mode needs a hash table for every batch (a predictor or --hash oracle)")
        ctx.hash_table = hash_table
        ctx.token_mask = token_mask
        ctx.shadow = shadow
        ctx.decoding = False
        ctx.offsets.clear()
        ctx.decoder_guesses = {}
        self._encoder_first = encoder_first
        if self.cache is None:
            return
        if decoder_input_ids is not None:
            self._guess_decoder_step(decoder_input_ids)
        self.cache.policy.expect(ctx.expect_pass())
        if hash_table is not None and hash_table.experts:
            self._prefetch_layer(min(hash_table.experts))

    def begin_decode_step(self, input_ids: torch.Tensor) -> None:
        """The expert engine's per-step hook: a decoder-only model's decode step of the running batch reads the last
        of `input_ids` [rows, 2] (its sequences' last two tokens; `DecodeBatch.step` calls it before each step's
        forward). No hash table covers tokens that do not exist yet: every layer is routed by its router, the
        prompt's table and mask end, and the first MoE layer's experts are guessed (lookahead.py)."""
        self.begin_batch()
        self.context.decoding = True
        self._guess_first_layer(input_ids)

    def _guess_first_layer(self, input_ids: torch.Tensor) -> None:
        """A decoder-only model's decode step reads the last of `input_ids` [rows, 2]: its first MoE layer's experts
        are guessed from the tokens' embeddings, and start loading now where that changes anything
        (`wants_hash_table`)."""
        ahead = self.context.lookahead
        if ahead is None:
            return
        ahead.begin_step(input_ids.to(self.device))
        if self.cache is not None and self.wants_hash_table:
            self._prefetch_layer(ahead.first)

    def _prefetch_layer(self, layer: int) -> None:
        """Start loading `layer`'s experts whose chance of use pays for the read (`DeviceExpertCache.prefetch`)."""
        chance = self.context.layer_chances(layer)
        self.cache.prefetch(list(chance), chance=chance)

    def begin_decoder_step(self, decoder_input_ids: torch.Tensor) -> None:
        """A later decoder step reads `decoder_input_ids` [batch, 1]: guess its experts and start loading the
        first decoder layer's. The decode loop calls it after each token (decoding.PrefetchNextStep)."""
        if self.context.causal:  # generate's decode loop over a decoder-only model: the layer-ahead guess
            self.context.expected = {}  # the prompt's table covers no decode step
            self._guess_first_layer(decoder_input_ids)
            return
        if self.cache is None or not self._guess_decoder_step(decoder_input_ids):
            return
        chance = self.context.expect_pass(table=False)  # the table's decoder rows, if any, were the first step's
        self.cache.policy.expect(chance, start=self.decoder_layers[0])  # the encoder's experts wait for the next batch
        self._prefetch_layer(self.decoder_layers[0])

    def _guess_decoder_step(self, decoder_input_ids: torch.Tensor) -> bool:
        """Every decoder MoE layer's guessed experts for the positions of this decoder call; False without a guess
        or where guessing changes nothing (see `wants_hash_table`: the same holds for a decoder step's guess)."""
        if self.decoder_guess is None or not self.decoder_layers or not self.wants_hash_table:
            return False
        ctx = self.context
        first = ctx.offsets[self.decoder_layers[0]]
        k = rank_depth(ctx.prefetch_k)
        keys = self.decoder_guess.keys(decoder_input_ids.to(self.device), self._encoder_first, first)
        ctx.decoder_guesses = {la: (first, self.decoder_guess.predict(la, keys, k)) for la in self.decoder_layers}
        return True

    def reset_stats(self) -> None:
        """Start counting afresh (after a warm-up); experts already resident stay where they are."""
        self.routing_stats.clear()
        if self.cache is not None:
            self.cache.stats = CacheStats(peak_resident=len(self.cache.resident_keys))

    @property
    def repairs(self) -> int:
        """Experts rewritten from the checkpoint after failing their checksum (the disk tier)."""
        return 0 if self.cache is None else self.cache.store.repairs

    @property
    def fault(self) -> str | None:
        """One line on an expert that cannot be read (the disk tier), else None."""
        return None if self.cache is None else self.cache.store.fault

    def close(self) -> None:
        """Stop the disk reads, then close the expert file; idempotent."""
        if self.cache is not None:
            self.cache.transfer.close()
            self.cache.store.close()

    def summary(self) -> dict:
        """The offload figures `sida eval --json` and `/info` report (measured by the cache, not recomputed)."""
        out = {
            "mode": self.cfg.mode,
            "budget_experts": self.num_slots,
            "budget": {"source": self.budget.source, "reason": self.budget.reason},
            "total_experts": self.total_experts,
            "expert_bytes": self.expert_bytes,
            "device_memory_bytes": {**self.memory.by_kind, "total": self.memory.total},
        }
        if self.cache is not None:
            store = self.cache.store
            out["host_memory_bytes"] = {
                "experts": store.host_bytes,
                "pinned": store.pinned_bytes + self.cache.transfer.staging_bytes,
            }
        if self.cache is None:
            out.update(
                expert_loads=0,
                expert_bytes_moved=0,
                peak_resident_experts=self.total_experts,
                cache_hit_rate=1.0,
                on_demand_loads=0,
                stall_seconds=0.0,
            )
            return out
        s = self.cache.stats
        out.update(
            policy=self.cfg.policy,
            tier=self.cfg.tier,
            expert_loads=s.loads,
            expert_bytes_moved=s.bytes_moved,
            peak_resident_experts=s.peak_resident,
            cache_hit_rate=round(s.hit_rate, 6) if s.hit_rate is not None else None,
            on_demand_loads=s.on_demand_loads,
            prefetch_loads=s.prefetch_loads,
            prefetch_cancelled=s.prefetch_cancelled,
            expert_lookups=s.lookups,
            evictions=s.evictions,
            waves=s.waves,
            stall_seconds=round(s.stall_seconds, 6),
            prefetch_used_bytes=sum(s.prefetch_used_bytes.values()),
            prefetch_unused_bytes=sum(s.prefetch_unused_bytes.values()),
            prefetch_precision=round(s.prefetch_precision, 6) if s.prefetch_precision is not None else None,
            link_busy=round(self.cache.link_busy, 4),  # the recent busy share that sets the prefetch bar
            stall_seconds_by_layer={la: round(v, 6) for la, v in sorted(dict(s.stall_by_layer).items())},
        )
        if self.cfg.tier == "disk":
            out["disk_io"] = self.cache.store.file.io
        out.update(self.routing_stats.hit_rates(self.layer_stack, self.context.causal))
        recall = self.routing_stats.decode_recall()
        if recall:
            out["decode_recall"] = recall
        if self.cfg.mode == "predicted":
            out["router_fallbacks"] = self.routing_stats.router_fallbacks
        return out


def _check(cfg: OffloadConfig) -> None:
    """Refuse a config that cannot work, before any work."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; expected one of {', '.join(MODES)}")
    make_policy(cfg.policy)
    explicit_budget(cfg.budget, cfg.budget_experts, cfg.budget_bytes, 1, 1)  # its errors, before any work
    if cfg.disk_io not in IO_MODES:
        raise ValueError(f"unknown disk io {cfg.disk_io!r}; expected one of {', '.join(IO_MODES)}")
    if cfg.tier not in ("ram", "disk"):
        raise ValueError(f"unknown expert tier {cfg.tier!r}; expected ram or disk")
    if cfg.prefetch_k < 1:
        raise ValueError("prefetch_k must be >= 1")
    if cfg.read_limit_bytes_per_s is not None and cfg.read_limit_bytes_per_s <= 0:
        raise ValueError("read_limit_bytes_per_s must be a positive number of bytes per second")
