"""Puts a loaded model under offload: experts move to an ExpertStore, a budgeted DeviceExpertCache serves them,
and every sparse MLP is replaced by a SiDA MoE layer. `resident` leaves the Hugging Face model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_store import ExpertStore
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import LoadedModel
from sida.offload.moe_layer import RoutingContext, SiDAMoELayer
from sida.offload.policies import make_policy
from sida.offload.transfer import Transfer

MODES = ("resident", "exact", "predicted")


@dataclass(frozen=True)
class OffloadConfig:
    mode: str = "resident"
    budget_experts: int | None = None  # slots for all MoE layers together; neither given: half of all experts
    budget_bytes: int | None = None  # alternative to budget_experts
    policy: str = "lru"
    tier: str = "ram"
    prefetch_k: int = 1  # predicted candidates per token made resident ahead of their layer (exact mode)
    expert_dir: Path | None = None  # where tier 'disk' keeps its expert file


def resolve_budget(cfg: OffloadConfig, expert_bytes: int, total_experts: int) -> int:
    """The number of slots; clear errors for budgets that cannot work."""
    if cfg.budget_experts is not None and cfg.budget_bytes is not None:
        raise ValueError("give the expert budget as experts or as bytes, not both")
    if cfg.budget_experts is not None:
        if cfg.budget_experts < 1:
            raise ValueError(f"expert budget must be at least 1 expert, got {cfg.budget_experts}")
        return min(cfg.budget_experts, total_experts)
    if cfg.budget_bytes is not None:
        if cfg.budget_bytes < expert_bytes:
            raise ValueError(f"expert budget of {cfg.budget_bytes} bytes is below one expert ({expert_bytes} bytes)")
        return min(cfg.budget_bytes // expert_bytes, total_experts)
    return max(1, (total_experts + 1) // 2)  # the default: half of all experts


class OffloadEngine:
    def __init__(self, loaded: LoadedModel, cfg: OffloadConfig, device: torch.device):
        if cfg.mode not in MODES:
            raise ValueError(f"unknown mode {cfg.mode!r}; expected one of {', '.join(MODES)}")
        make_policy(cfg.policy)  # validate before any work
        if cfg.tier not in ("ram", "disk"):
            raise ValueError(f"unknown expert tier {cfg.tier!r}; expected ram or disk")
        if cfg.prefetch_k < 1:
            raise ValueError("prefetch_k must be >= 1")
        self.cfg = cfg
        self.loaded = loaded
        self.device = device
        model, adapter = loaded.model, loaded.adapter
        layers = adapter.moe_layers(model)
        self.num_layers = len(layers)
        self.num_experts = adapter.num_experts(model)
        self.total_experts = self.num_layers * self.num_experts
        self.context = RoutingContext(mode=cfg.mode, prefetch_k=cfg.prefetch_k)
        self.cache: DeviceExpertCache | None = None
        self.first_layer_stack = layers[0].stack
        self.layer_stack = {la.index: la.stack for la in layers}
        self.decoder_layers = [la.index for la in layers if la.stack == "decoder"]
        self.decoder_guess = None  # predictor.decoder.DecoderGuess: per-step guesses for decoder layers
        if cfg.mode == "resident":
            self.expert_bytes = sum(p.numel() * p.element_size() for p in layers[0].experts[0].parameters())
            self.capacity = self.total_experts
            return

        disk_path = None
        if cfg.tier == "disk":
            root = cfg.expert_dir or Path.home() / ".cache" / "sida" / "experts"
            disk_path = Path(root) / f"{loaded.fingerprint}-{str(model.dtype).removeprefix('torch.')}.safetensors"
            if model.dtype == torch.bfloat16:
                raise ValueError("tier 'disk' stores fp32 or fp16 experts; load the model in one of those")
        pin = device.type == "cuda" and cfg.tier == "ram"
        store = ExpertStore.from_experts(
            (((la.index, e), module) for la in layers for e, module in enumerate(la.experts)), cfg.tier, pin, disk_path
        )
        self.expert_bytes = store.expert_bytes
        self.capacity = resolve_budget(cfg, store.expert_bytes, self.total_experts)
        transfer = Transfer(device, store.layout.numel, store.layout.dtype)
        self.cache = DeviceExpertCache(store, self.capacity, make_policy(cfg.policy), device, transfer)
        forward = adapter.expert_forward(model)
        capacity = adapter.expert_capacity(model)
        decoder_first = next((la.index for la in layers if la.stack == "decoder"), None)
        for i, la in enumerate(layers):
            if i + 1 < len(layers):
                nxt = layers[i + 1]
            else:  # after the last decoder layer comes the first decoder layer of the next step
                nxt = layers[decoder_first] if la.stack == "decoder" else None
            module = SiDAMoELayer(
                la.index,
                la.stack,
                la.mlp.router,
                forward,
                self.cache,
                self.context,
                nxt.index if nxt is not None else None,
                nxt.stack if nxt is not None else None,
                self.num_experts,
                capacity,
            )
            adapter.replace_moe(model, la, module.to(device))
        del layers  # the original sparse MLPs, and with them the model's own expert weights, are freed
        if self.decoder_layers:
            model.get_decoder().register_forward_pre_hook(self._on_decoder_call, with_kwargs=True)

    def set_decoder_guess(self, guess) -> None:
        missing = set(self.decoder_layers) - set(guess.layers)
        if missing:
            raise ValueError(f"the decoder table has no rows for decoder MoE layers {sorted(missing)}")
        self.decoder_guess = guess.to(self.device)

    def _guess_decoder(self, decoder_input_ids: torch.Tensor) -> None:
        """Guess every decoder MoE layer's experts for the positions of this decoder call (their input tokens
        are known now, at the start of the step)."""
        ctx = self.context
        first = ctx.offsets[self.decoder_layers[0]]
        k = max(3, ctx.prefetch_k)  # ranked as deep as the encoder's tables, for the top-1..3 hit counts
        keys = self.decoder_guess.keys(decoder_input_ids.to(self.device), ctx.encoder_first, first)
        ctx.decoder_rows = {la: (first, self.decoder_guess.predict(la, keys, k)) for la in self.decoder_layers}

    def _on_decoder_call(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.decoder_guess is None or ids is None:
            return
        self._guess_decoder(ids)
        layer = self.decoder_layers[0]
        _first, guess = self.context.decoder_rows[layer]
        experts = sorted(set(guess[..., : self.context.prefetch_k].reshape(-1).tolist()))
        self.cache.prefetch([(layer, e) for e in experts])

    @property
    def wants_hash_table(self) -> bool:
        """Whether a batch's hash table would change anything: `predicted` routes by it; `exact` prefetches with it,
        which pays only where experts get evicted. With a budget that holds every expert, nothing is ever evicted:
        each expert is loaded once, on its first use, and hashing every batch would be pure overhead."""
        if self.cfg.mode == "predicted":
            return True
        return self.cache is not None and self.capacity < self.total_experts

    def begin_batch(
        self,
        token_mask: torch.Tensor | None = None,
        hash_table: HashTable | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_first: torch.Tensor | None = None,
    ) -> None:
        """Reset per-batch routing state; with a table, start loading the first MoE layer's experts now. With the
        decoder's first input tokens and a decoder table, the last encoder layer prefetches for the decoder;
        `encoder_first` (each row's first input token) keys the table's first-step rows."""
        ctx = self.context
        ctx.encoder_first = encoder_first
        if ctx.mode == "predicted" and hash_table is None:
            raise ValueError("predicted mode needs a hash table for every batch (a predictor or --hash oracle)")
        ctx.hash_table = hash_table
        ctx.token_mask = token_mask
        ctx.offsets.clear()
        ctx.decoder_rows = {}
        if self.decoder_guess is not None and decoder_input_ids is not None and self.cache is not None:
            self._guess_decoder(decoder_input_ids)
        if self.cache is not None and hash_table is not None:
            first = min(hash_table.experts) if hash_table.experts else None
            if first is not None:
                mask = token_mask if self.first_layer_stack == "encoder" else None
                keys = hash_table.candidates(first, ctx.prefetch_k, mask=mask)
                self.cache.prefetch([(first, e) for e in keys])

    def reset_stats(self) -> None:
        """Start counting afresh (after a warm-up); experts already resident stay where they are."""
        from sida.offload.device_cache import CacheStats

        ctx = self.context
        ctx.hash_lookups.clear()
        ctx.hash_hits.clear()
        ctx.router_fallbacks = 0
        if self.cache is not None:
            self.cache.stats = CacheStats(peak_resident=len(self.cache.resident_keys))

    def summary(self) -> dict:
        """The offload figures `sida eval --json` reports (measured by the cache, not recomputed)."""
        ctx = self.context
        out = {
            "mode": self.cfg.mode,
            "budget_experts": self.capacity,
            "total_experts": self.total_experts,
            "expert_bytes": self.expert_bytes,
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
            expert_lookups=s.lookups,
            evictions=s.evictions,
            waves=s.waves,
            stall_seconds=round(s.stall_seconds, 6),
        )
        for stack, key in (("encoder", "hash_hit_rate"), ("decoder", "decoder_hash_hit_rate")):
            layers = {la for la, s in self.layer_stack.items() if s == stack}
            lookups = sum(n for la, n in ctx.hash_lookups.items() if la in layers)
            if lookups:
                ks = sorted({k for la, k in ctx.hash_hits if la in layers})
                out[key] = {
                    f"top{k}": round(
                        sum(n for (la, kk), n in ctx.hash_hits.items() if kk == k and la in layers) / lookups, 6
                    )
                    for k in ks
                }
        if ctx.mode == "predicted":
            out["router_fallbacks"] = ctx.router_fallbacks
        return out
