"""The host copy of every expert, one packed buffer per (layer, expert): in RAM, or in a file on disk.

Tier `ram` packs the experts into one arena of a few large buffers, pinned when CUDA is present (copies can
then be asynchronous, and one allocation per chunk avoids the pinned allocator rounding every expert up to a
power of two). Tier `disk` keeps them in the expert file (`expert_file.py`) and reads one when a slot needs
it, so the host holds no expert of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sida.offload.expert_file import ExpertFile, open_expert_file
from sida.offload.expert_layout import ExpertKey, ExpertLayout, ExpertSource, ModuleExperts
from sida.offload.io_queue import RateLimit
from sida.offload.memory import aligned_empty, pinned_reserved

ARENA_CHUNK_BYTES = 256 << 20  # the ram tier's arena is cut into buffers of about this size


class ExpertStore:
    """Host-side source of expert weights; `host(key)` is what a cache slot copies from."""

    tier: str

    def __init__(self, layout: ExpertLayout, keys: list[ExpertKey]):
        self.layout = layout
        self.keys = keys

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all are the same size)."""
        return self.layout.nbytes

    @property
    def read_bytes(self) -> int:
        """Bytes one load reads into a slot's buffer: the expert itself (the disk tier rounds it up to what an
        O_DIRECT read needs)."""
        return self.layout.nbytes

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes > 0

    @property
    def pinned_bytes(self) -> int:
        """Host bytes held as page-locked memory (as the pinned allocator reserves them)."""
        return 0

    @property
    def host_bytes(self) -> int:
        """Host bytes the store keeps allocated for expert weights (buffers, not the file on disk)."""
        return 0

    @property
    def repairs(self) -> int:
        """Experts rewritten from the checkpoint after failing their checksum (the disk tier)."""
        return 0

    @property
    def fault(self) -> str | None:
        """One line on an expert that cannot be read (the disk tier), else None."""
        return None

    def host(self, key: ExpertKey) -> torch.Tensor:
        """The host buffer [numel] of one expert: what a slot copies from (valid until the next call)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the store holds open (the disk tier's file); idempotent."""

    @classmethod
    def build(
        cls,
        source: ExpertSource,
        tier: str = "ram",
        pin: bool = False,
        disk_path: Path | None = None,
        fingerprint: str = "",
        disk_io: str = "direct",
    ) -> ExpertStore:
        """Every expert of `source` in the host tier. Tier 'disk': the file at `disk_path` is written once (and
        rewritten if it is not this model's, by `fingerprint`) and read with `disk_io` ("direct" or "dontneed")."""
        if tier == "ram":
            return RamExperts(source, pin)
        if tier == "disk":
            if disk_path is None:
                raise ValueError("tier 'disk' needs a path for the expert file")
            # a model's own modules are not kept to repair the file from: they would hold every expert in RAM
            repair = not isinstance(source, ModuleExperts)
            return DiskExperts(open_expert_file(disk_path, source, fingerprint, disk_io, repair), source.keys)
        raise ValueError(f"unknown expert tier {tier!r}; expected ram or disk")

    @classmethod
    def from_experts(
        cls,
        experts: Iterable[tuple[ExpertKey, nn.Module]],
        tier: str = "ram",
        pin: bool = False,
        disk_path: Path | None = None,
        disk_io: str = "direct",
    ) -> ExpertStore:
        """A store of the experts of modules already loaded."""
        return cls.build(ModuleExperts(experts), tier, pin, disk_path, disk_io=disk_io)


class RamExperts(ExpertStore):
    """Every expert in host RAM: an arena of chunks of whole experts, each chunk one allocation."""

    tier = "ram"

    def __init__(self, source: ExpertSource, pin: bool):
        super().__init__(source.layout, source.keys)
        layout = source.layout
        per_chunk = max(1, ARENA_CHUNK_BYTES // layout.nbytes)
        self._chunks: list[torch.Tensor] = []
        self._buffers: dict[ExpertKey, torch.Tensor] = {}
        for first in range(0, len(self.keys), per_chunk):
            keys = self.keys[first : first + per_chunk]
            chunk = torch.empty(len(keys), layout.numel, dtype=layout.dtype, pin_memory=pin)
            self._chunks.append(chunk)
            for row, key in enumerate(keys):
                source.read_into(key, chunk[row])
                self._buffers[key] = chunk[row]
        self._pin = pin

    @property
    def pinned_bytes(self) -> int:
        return sum(pinned_reserved(c) for c in self._chunks) if self._pin else 0

    @property
    def host_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)

    def host(self, key: ExpertKey) -> torch.Tensor:
        return self._buffers[key]


class DiskExperts(ExpertStore):
    """Every expert in the expert file; a load reads one (`read_into`) into the slot or a staging buffer, so the
    host holds no expert of its own however many the file has."""

    tier = "disk"

    def __init__(self, file: ExpertFile, keys: list[ExpertKey]):
        super().__init__(file.layout, keys)
        self.file = file
        self.path = file.path
        self._staging: torch.Tensor | None = None
        self.read_limit: RateLimit | None = None  # every read paced to a set rate (benchmarks: a disk of known speed)

    @property
    def read_bytes(self) -> int:
        return self.file.read_bytes

    @property
    def repairs(self) -> int:
        return self.file.repairs

    @property
    def fault(self) -> str | None:
        return self.file.fault

    def close(self) -> None:
        self.file.close()

    @property
    def host_bytes(self) -> int:
        return 0 if self._staging is None else self._staging.numel()

    def read_into(self, key: ExpertKey, buf: torch.Tensor) -> None:
        """Read expert `key` into `buf` (uint8, `read_bytes` long, aligned: see `device.aligned_empty`)."""
        if self.read_limit is None:
            self.file.read_into(key, buf)
        else:
            self.read_limit.paced(self.read_bytes, lambda: self.file.read_into(key, buf))

    def host(self, key: ExpertKey) -> torch.Tensor:
        """Expert `key` read into this store's own staging buffer [numel] (valid until the next call)."""
        if self._staging is None:
            self._staging = aligned_empty(self.read_bytes)
        self.file.read_into(key, self._staging)
        return self._staging[: self.layout.nbytes].view(self.layout.dtype)
