"""The running decode batch's KV cache: transformers' own `DynamicCache`, one left-padded tensor pair per attention
layer ([batch, heads, width, head_dim]), with the two operations iteration-level scheduling needs and the model's
cache classes lack: joining the cache of freshly prefilled sequences to the running one, and keeping only some rows.

Rows are left-padded to a common width, as `generate` pads a batch: a row's padding columns are masked out by its
attention mask, and its positions (`position_ids`) count only its real tokens, so a sequence computes the same
whatever batch it runs in. What this reads of the cache (`layers`, each layer's `keys`, `values`,
`is_initialized`) is pinned by tests/offload/test_decode_batch.py.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def unsupported(config) -> str | None:
    """Why a model's cache cannot be joined and split by rows (None: it can): every layer must be a plain
    full-attention `DynamicLayer` (a sliding-window layer keeps only its last tokens, whose columns differ by row)."""
    try:
        cache = DynamicCache(config=config)
    except Exception as e:  # noqa: BLE001 — any model the cache classes cannot build for is served statically
        return f"transformers' DynamicCache cannot be built for it ({type(e).__name__}: {e})"
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds - {DynamicLayer.__name__}:
        return f"its KV cache has {sorted(kinds - {DynamicLayer.__name__})} layers (only full attention is joined)"
    return None


def cache_argument(model) -> str:
    """The forward's name for the cache it reads and extends: `cache` from transformers 5.2x on, `past_key_values`
    before (5.17 has only that name; later ones take it with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def nbytes(cache: DynamicCache | None) -> int:
    """Bytes the cache's tensors hold."""
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in _filled(cache) for t in (layer.keys, layer.values))


def join(running: DynamicCache | None, new: DynamicCache) -> DynamicCache:
    """`running`'s rows then `new`'s, left-padded with zeros to the wider of the two (their attention masks are
    padded alike by the caller); `new` when nothing runs."""
    if running is None or not _filled(running):
        return new
    for old, add in zip(running.layers, new.layers):
        w = max(old.keys.shape[-2], add.keys.shape[-2])
        old.keys = torch.cat([pad_left(old.keys, w, -2), pad_left(add.keys, w, -2)])
        old.values = torch.cat([pad_left(old.values, w, -2), pad_left(add.values, w, -2)])
    return running


def keep(cache: DynamicCache, rows: list[int], drop_columns: int = 0) -> DynamicCache:
    """Only `rows`, without the first `drop_columns` columns (padding every kept row has there)."""
    index = torch.tensor(rows, dtype=torch.long, device=_filled(cache)[0].keys.device)
    for layer in _filled(cache):
        layer.keys = layer.keys.index_select(0, index)[..., drop_columns:, :]
        layer.values = layer.values.index_select(0, index)[..., drop_columns:, :]
    return cache


def _filled(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys.numel()]


def pad_left(t: torch.Tensor, w: int, dim: int) -> torch.Tensor:
    """`t` with zeros before it along `dim` up to size `w` there: a cache tensor [batch, heads, width, head_dim]
    along its positions (-2), or an attention mask [rows, width] (-1)."""
    missing = w - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
