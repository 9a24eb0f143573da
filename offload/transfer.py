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

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        """Start dst ← src; returns a handle for `wait` (None when the copy is already complete)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        # the slot may still be read by compute already queued (the expert it held was evicted, not finished):
        # the copy waits for that work, and for nothing issued after this point
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
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
