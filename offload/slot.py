"""A cache slot: one device buffer for one packed expert, and the record of where it is in its life.

A slot goes free → loading → ready ⇄ pinned and back to free; each transition is a method of `Slot`, the only code
that changes one, and a transition its state does not allow raises `SlotStateError` (a bug in the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from sida.offload.expert_layout import ExpertKey


class SlotState(Enum):
    """Where a slot is in its life: empty, being filled, holding an expert, or holding one compute reads now."""

    FREE = "free"
    LOADING = "loading"
    READY = "ready"
    PINNED = "pinned"  # ready, with pins > 0


class SlotStateError(RuntimeError):
    """A slot was asked for a transition its state does not allow (a bug in the cache, never a user error)."""


@dataclass(eq=False)
class Slot:
    """One device buffer and everything known about it. Its transitions are its methods, and only they change it.

    `last_read` is the event after the last kernels that read the slot (CUDA; None on CPU): a copy into the slot
    must be ordered after it. Only `loaded` drops it, once a copy ordered after it has been waited for; every way
    back to free (eviction, a cancelled or failed load) keeps it for the next copy."""

    index: int
    tensor: torch.Tensor = field(repr=False)  # [numel] the packed expert, on the device
    raw: torch.Tensor | None = field(repr=False)  # CPU: the slot's aligned bytes [read_bytes], for disk reads
    views: dict[str, torch.Tensor] = field(repr=False)  # parameter views into `tensor`
    key: ExpertKey | None = None
    state: SlotState = SlotState.FREE
    pins: int = 0
    pending: object | None = None  # the load's handle until it is waited for
    last_read: object | None = None
    prefetched_unused: bool = False  # holds (or loads) a prefetched expert no layer has used yet

    def _require(self, action: str, *states: SlotState) -> None:
        if self.state not in states:
            raise SlotStateError(f"slot {self.index} ({self.key}) is {self.state.value}: cannot {action}")

    def start_load(self, key: ExpertKey, handle: object | None, prefetch: bool) -> None:
        """free → loading: a copy of `key` was started (ordered after `last_read`); `handle` waits for it."""
        self._require("start a load", SlotState.FREE)
        self.key, self.state, self.pending, self.prefetched_unused = key, SlotState.LOADING, handle, prefetch

    def loaded(self) -> None:
        """loading → ready: the copy (ordered after `last_read`) has been waited for; any later copy follows it on
        the same stream, so the event has served."""
        self._require("finish a load", SlotState.LOADING)
        self.state, self.pending, self.last_read = SlotState.READY, None, None

    def pin(self) -> None:
        """ready/pinned → pinned: one more compute user."""
        self._require("pin", SlotState.READY, SlotState.PINNED)
        self.state, self.pins = SlotState.PINNED, self.pins + 1

    def unpin(self, reads_done: object | None) -> None:
        """pinned → pinned/ready: one user fewer; `reads_done` (after every read queued so far) is the new
        last reader."""
        self._require("unpin", SlotState.PINNED)
        self.pins -= 1
        if self.pins == 0:
            self.state = SlotState.READY
        if reads_done is not None:
            self.last_read = reads_done

    def take_unused(self) -> bool:
        """Whether this was a prefetch no layer had used yet; it counts once (used, or evicted unused)."""
        unused, self.prefetched_unused = self.prefetched_unused, False
        return unused

    def give_back(self) -> None:
        """loading/ready → free (evicted, or its load cancelled or failed), keeping `last_read`: the next copy into
        the slot must still wait for those readers."""
        self._require("be given back", SlotState.LOADING, SlotState.READY)
        self.key, self.state, self.pending, self.prefetched_unused = None, SlotState.FREE, None, False
