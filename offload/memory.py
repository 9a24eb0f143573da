"""Memory, host and device: the account of every byte sida places on the device, peak usage (device allocations,
resident set size), what the host has free, and the aligned and pinned host buffers the transfers use."""

from __future__ import annotations

import torch


class DeviceMemoryError(RuntimeError):
    """Placing more on the device would pass its declared limit."""


class DeviceMemory:
    """Every byte sida places on the compute device, by kind (dense weights, expert slots), against an optional
    declared limit. Activations are not in it: they are the headroom the budget leaves free."""

    def __init__(self, device: torch.device, limit: int | None = None):
        self.device = device
        self.limit = limit
        self.by_kind: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def place(self, kind: str, nbytes: int) -> None:
        """Account `nbytes` more of `kind`; a DeviceMemoryError, before anything is allocated, past the limit."""
        if self.limit is not None and self.total + nbytes > self.limit:
            raise DeviceMemoryError(
                f"{kind} needs {nbytes / 2**20:.1f} MiB more on {self.device.type}, over the declared limit of "
                f"{self.limit / 2**20:.1f} MiB ({self.total / 2**20:.1f} MiB already placed)"
            )
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def free_bytes(self, reserve: int = 0) -> int:
        """What more may be placed: what the device (on CPU: host RAM) has free less `reserve`, or the declared
        limit's rest where that is lower."""
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = host_available_bytes()
        free -= reserve
        if self.limit is not None:
            free = min(free, self.limit - self.total)
        return max(0, free)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct, materialised tensors (tied weights once, meta tensors not at all)."""
    seen, total = set(), 0
    for t in tensors:
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def host_available_bytes() -> int:
    """RAM this process may still take: MemAvailable, or the cgroup's limit less its usage where that is lower."""
    available = _meminfo("MemAvailable")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            available = min(available, int(limit) - usage)
            break
    return available


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/meminfo has no {field}")


class PeakMemory:
    """Peak memory growth over a block: device allocations on CUDA, resident set size on CPU.

    with PeakMemory(device) as peak:
        model(...)
    peak.bytes  # the most the block held at once beyond what was held before it
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._before = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status("VmHWM")
        self.bytes = max(0, peak - self._before)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (the kernel's high-water mark, VmHWM)."""
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (where allowed) and return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not allowed: the peak since start is used, which can only overstate the headroom
    return _status("VmRSS")


def pinned_reserve(nbytes: int) -> int:
    """Bytes torch's pinned host allocator reserves for an allocation of `nbytes`: the next power of two."""
    return 1 << (nbytes - 1).bit_length()


def pinned_reserved(t: torch.Tensor) -> int:
    """Bytes the pinned allocator reserves for the allocation `t` views: all of it (an aligned buffer's slack
    included), rounded as `pinned_reserve` does."""
    return pinned_reserve(t.untyped_storage().nbytes())


def aligned_empty(nbytes: int, align: int = 4096, pin: bool = False) -> torch.Tensor:
    """An uninitialised host buffer of `nbytes` (uint8) whose address is a multiple of `align` (O_DIRECT reads
    need it); pinned if asked. It views an allocation `align` bytes longer: see `pinned_reserved`."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=pin)
    offset = -raw.data_ptr() % align
    return raw[offset : offset + nbytes]
