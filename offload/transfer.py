"""Copies of expert weights into device slots: asynchronous on a side CUDA stream, synchronous on CPU.

The same calls run on both, so every rule of the cache is exercised by CPU tests. On CUDA a copy
returns an event; the compute stream waits on that event (no host sync) before the slot is read.
Sources from pageable memory (the disk tier's mapped file) are first staged through a pinned bounce
buffer, because a non-blocking copy from pageable memory silently blocks (a bug of the paper's code).
"""

from __future__ import annotations

import time

import torch


class Transfer:
    """Copies host expert buffers into device slots: a side stream and events on CUDA, plain copies on CPU."""

    def __init__(self, device: torch.device, expert_numel: int, dtype: torch.dtype):
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._bounce = torch.empty(expert_numel, dtype=dtype, pin_memory=True) if self.cuda else None

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes of the bounce buffer (the pinned allocator reserves a power of two)."""
        if self._bounce is None:
            return 0
        return 1 << (self._bounce.numel() * self._bounce.element_size() - 1).bit_length()

    def reads_done(self):
        """An event after the compute kernels queued so far (the last reads of a slot being released); None on
        CPU, where compute has already run."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Start dst ← src once the event `after` (the last reads of dst, from `reads_done`) has passed; returns a
        handle for `wait` (None when the copy is already complete)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        # the slot may still be read by compute already queued (the expert it held was evicted, not finished):
        # the copy waits for those kernels, not for everything the compute stream has queued
        if after is not None:
            self._stream.wait_event(after)
        with torch.cuda.stream(self._stream):
            if not src.is_pinned():
                # the bounce buffer is reused: the previous staged copy must have left it
                self._stream.synchronize()
                self._bounce.copy_(src)
                src = self._bounce
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def wait(self, handle, block: bool = False) -> float:
        """Make compute wait for a copy; with block=True the host waits too. Returns host seconds spent."""
        if handle is None:
            return 0.0
        if block:
            t0 = time.perf_counter()
            handle.synchronize()
            return time.perf_counter() - t0
        torch.cuda.current_stream(self.device).wait_event(handle)
        return 0.0
