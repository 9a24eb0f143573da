"""Loads of expert weights into device slots: from the host store (RAM) or from the expert file (disk).

- RAM → a CUDA slot: an asynchronous copy on a side stream, with an event the compute stream waits on.
  Pageable sources are first staged through a pinned bounce buffer, because a non-blocking copy from
  pageable memory silently blocks (a bug of the paper's code).
- RAM → a CPU slot: a plain copy (a memcpy; nothing to overlap).
- Disk → a slot: a read on the I/O queue's reader threads (the read releases the GIL), so prefetches overlap
  the layer being computed on CPU too; needed reads go ahead of speculative ones (`io_queue.py`). On CUDA the
  thread reads into pinned staging and then starts the asynchronous copy, so the host never waits on compute
  to start a read.

A load returns a handle (None when already complete); `done` polls it and `wait` makes compute wait for it.
The same calls run on CPU and CUDA, so every rule of the cache is exercised by CPU tests; every stream and event
call goes through one `StreamOps` object, which a test may replace to record the order of copies and reads.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import torch

from sida.offload.device import CudaStreams, StreamOps
from sida.offload.io_queue import NEEDED, SPECULATIVE, IOQueue
from sida.offload.memory import aligned_empty, pinned_reserved

IO_THREADS = 2  # concurrent expert reads from disk
CUDA_STAGING = IO_THREADS + 1  # pinned staging buffers for disk → CUDA loads


class Transfer:
    """Starts loads into slots and waits for them: side stream and events on CUDA, an I/O pool for disk."""

    def __init__(self, device: torch.device, expert_numel: int, dtype: torch.dtype, streams: StreamOps | None = None):
        """`streams`: the stream calls for asynchronous copies (default: CUDA's on a CUDA device, none on CPU)."""
        self.device = device
        self.streams = streams if streams is not None else CudaStreams(device) if device.type == "cuda" else None
        self._pin = device.type == "cuda"  # page-locked host buffers exist only beside a CUDA device
        self.dtype = dtype
        self.numel = expert_numel
        self._stream, self._bounce = None, None
        if self.streams is not None:
            self._stream = self.streams.side_stream()
            self._bounce = torch.empty(expert_numel, dtype=dtype, pin_memory=self._pin)  # [numel]
        self._pool: IOQueue | None = None
        self._staging: queue.Queue | None = None
        self._staging_buffers: list[torch.Tensor] = []  # every one made, in the queue or held by a read in flight
        self.failed_reads = 0  # expert reads that raised, counted as they fail (`sida_expert_load_failures_total`)
        self._failures_lock = threading.Lock()

    def start_io(self, read_bytes: int) -> None:
        """The disk tier's reader threads and, with streams, its staging buffers (pinned on CUDA): started by the
        engine at start-up, else by the first disk load."""
        self._pool = IOQueue(IO_THREADS)
        if self.streams is not None:
            self._staging = queue.Queue()
            self._staging_buffers = [aligned_empty(read_bytes, pin=self._pin) for _ in range(CUDA_STAGING)]
            for buf in self._staging_buffers:
                self._staging.put(buf)

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes of the bounce and staging buffers, as the pinned allocator reserved them; a staging
        buffer a read holds counts too, so the figure does not dip under load."""
        if not self._pin:
            return 0
        buffers = [] if self._bounce is None else [self._bounce]
        return sum(pinned_reserved(b) for b in buffers + self._staging_buffers)

    def reads_done(self):
        """An event after the compute kernels queued so far (the last reads of a slot being released); None on
        CPU, where compute has already run."""
        if self.streams is None:
            return None
        return self.streams.record(self.streams.compute_stream())

    def load(self, store, key, dst: torch.Tensor, raw: torch.Tensor | None, after=None, speculative=False, order=()):
        """Start filling slot `dst` [numel] with expert `key` of `store` once the event `after` (the slot's last
        reads, from `reads_done`) has passed. `raw` is the CPU slot's aligned bytes, which a disk read fills
        directly. Returns a handle for `done`/`wait`, or None when the load is already complete. A disk load
        orders its copy after `after` on the I/O thread, so one cancelled or failed before its copy ordered
        nothing; a `speculative` one (a prefetch) waits behind every needed read, in `order` among its kind."""
        if store.tier == "disk":
            if self._pool is None:
                self.start_io(store.read_bytes)
            priority = SPECULATIVE if speculative else NEEDED
            return self._pool.submit(self._from_disk, store, key, dst, raw, after, priority=priority, order=order)
        return self.copy(dst, self._read(store.host, key), after)

    def busy_share(self) -> float | None:
        """The recent share of time the disk readers are busy (tier disk), else None."""
        return None if self._pool is None else self._pool.busy.share

    def promote(self, handle, order=()) -> bool:
        """A speculative load is needed now: its read, if not started, goes ahead of every speculative one."""
        return isinstance(handle, Future) and self._pool is not None and self._pool.promote(handle, order)

    def _read(self, read, *args):
        """`read(*args)`, counting it in `failed_reads` if it raises (from any thread)."""
        try:
            return read(*args)
        except BaseException:
            with self._failures_lock:
                self.failed_reads += 1
            raise

    def _from_disk(self, store, key, dst: torch.Tensor, raw: torch.Tensor | None, after):
        """On an I/O thread: read the expert into the CPU slot, or into staging and on to the device slot."""
        if self.streams is None:
            self._read(store.read_into, key, raw)
            return None
        staging = self._staging.get()
        try:
            self._read(store.read_into, key, staging)
            event = self.copy(dst, staging[: self.numel * dst.element_size()].view(self.dtype), after)
            self.streams.host_wait(event)  # the staging buffer is free again once its copy is done
        finally:
            self._staging.put(staging)
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Start dst ← src from host memory once `after` has passed; an event, or None (no streams: done)."""
        streams = self.streams
        if streams is None:
            dst.copy_(src)
            return None
        # the slot may still be read by compute already queued (the expert it held was evicted, not finished):
        # the copy waits for those kernels, not for everything the compute stream has queued
        if after is not None:
            streams.wait(self._stream, after)
        if not streams.is_pinned(src):
            # a non-blocking copy from pageable memory would block: stage it through the pinned bounce buffer,
            # which the previous staged copy must have left
            streams.host_wait_stream(self._stream)
            self._bounce.copy_(src)  # [numel], host → host
            src = self._bounce
        streams.copy(self._stream, dst, src)  # [numel], host → device slot
        return streams.record(self._stream)

    def cancel(self, handle) -> bool:
        """Cancel a load whose read has not started (disk tier); False if it cannot be cancelled."""
        return isinstance(handle, Future) and handle.cancel()

    def done(self, handle) -> bool:
        """Whether the load has completed (a failed read counts as done: `wait` raises its error)."""
        if handle is None:
            return True
        if isinstance(handle, Future):
            return handle.done() and (handle.exception() is not None or self.done(handle.result()))
        return self.streams.done(handle)

    def wait(self, handle, block: bool = False) -> float:
        """Make compute wait for a load (a failed read raises here); with block=True the host waits for the copy
        too. Returns the host seconds spent waiting."""
        t0 = time.perf_counter()
        if isinstance(handle, Future):
            handle = handle.result()  # the read itself: the host needs it before compute can be queued
        if handle is not None:
            if block:
                self.streams.host_wait(handle)
            else:
                self.streams.wait(self.streams.compute_stream(), handle)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the I/O threads: queued reads are cancelled, one under way finishes first; idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
