"""Loads of expert weights into device slots: from the host store (RAM) or from the expert file (disk).

- RAM → a CUDA slot: an asynchronous copy on a side stream, with an event the compute stream waits on.
  Pageable sources are first staged through a pinned bounce buffer, because a non-blocking copy from
  pageable memory silently blocks (a bug of the paper's code).
- RAM → a CPU slot: a plain copy (a memcpy; nothing to overlap).
- Disk → a slot: a read on an I/O thread pool (the read releases the GIL), so prefetches overlap the
  layer being computed on CPU too; on CUDA the thread reads into pinned staging and then starts the
  asynchronous copy, so the host never waits on compute to start a read.

A load returns a handle (None when already complete); `done` polls it and `wait` makes compute wait for it.
The same calls run on CPU and CUDA, so every rule of the cache is exercised by CPU tests.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sida.offload.memory import aligned_empty, pinned_reserve

IO_THREADS = 2  # concurrent expert reads from disk
CUDA_STAGING = IO_THREADS + 1  # pinned staging buffers for disk → CUDA loads


class Transfer:
    """Starts loads into slots and waits for them: side stream and events on CUDA, an I/O pool for disk."""

    def __init__(self, device: torch.device, expert_numel: int, dtype: torch.dtype):
        self.device = device
        self.cuda = device.type == "cuda"
        self.dtype = dtype
        self.numel = expert_numel
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._bounce = torch.empty(expert_numel, dtype=dtype, pin_memory=True) if self.cuda else None
        self._pool: ThreadPoolExecutor | None = None
        self._staging: queue.Queue | None = None

    def start_io(self, read_bytes: int) -> None:
        """The disk tier's reader threads and, on CUDA, its pinned staging buffers: started by the engine at
        start-up, else by the first disk load."""
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="sida-io")
        if self.cuda:
            self._staging = queue.Queue()
            for _ in range(CUDA_STAGING):
                self._staging.put(aligned_empty(read_bytes, pin=True))

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes of the bounce and staging buffers (the pinned allocator reserves a power of two)."""
        buffers = [] if self._bounce is None else [self._bounce.numel() * self._bounce.element_size()]
        if self._staging is not None:
            buffers += [b.numel() for b in list(self._staging.queue)]
        return sum(pinned_reserve(n) for n in buffers)

    def reads_done(self):
        """An event after the compute kernels queued so far (the last reads of a slot being released); None on
        CPU, where compute has already run."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def load(self, store, key, dst: torch.Tensor, raw: torch.Tensor | None, after=None):
        """Start filling slot `dst` [numel] with expert `key` of `store` once the event `after` (the slot's last
        reads, from `reads_done`) has passed. `raw` is the CPU slot's aligned bytes, which a disk read fills
        directly. Returns a handle for `done`/`wait`, or None when the load is already complete."""
        if store.tier == "disk":
            if self._pool is None:
                self.start_io(store.read_bytes)
            return self._pool.submit(self._from_disk, store, key, dst, raw, after)
        return self.copy(dst, store.host(key), after)

    def _from_disk(self, store, key, dst: torch.Tensor, raw: torch.Tensor | None, after):
        """On an I/O thread: read the expert into the CPU slot, or into pinned staging and on to the CUDA slot."""
        if not self.cuda:
            store.read_into(key, raw)
            return None
        staging = self._staging.get()
        try:
            store.read_into(key, staging)
            event = self.copy(dst, staging[: self.numel * dst.element_size()].view(self.dtype), after)
            event.synchronize()  # the staging buffer is free again once its copy is done
        finally:
            self._staging.put(staging)
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Start dst ← src from host memory once `after` has passed; a CUDA event, or None (CPU: done)."""
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

    def cancel(self, handle) -> bool:
        """Cancel a load whose read has not started (disk tier); False if it cannot be cancelled."""
        return isinstance(handle, Future) and handle.cancel()

    def done(self, handle) -> bool:
        """Whether the load has completed (a failed read counts as done: `wait` raises its error)."""
        if handle is None:
            return True
        if isinstance(handle, Future):
            return handle.done() and (handle.exception() is not None or self.done(handle.result()))
        return handle.query()

    def wait(self, handle, block: bool = False) -> float:
        """Make compute wait for a load (a failed read raises here); with block=True the host waits for the copy
        too. Returns the host seconds spent waiting."""
        t0 = time.perf_counter()
        if isinstance(handle, Future):
            handle = handle.result()  # the read itself: the host needs it before compute can be queued
        if handle is not None:
            if block:
                handle.synchronize()
            else:
                torch.cuda.current_stream(self.device).wait_event(handle)
        return time.perf_counter() - t0
