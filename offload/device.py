"""The one place that decides which device sida computes on, and the one object through which the transfers queue
work on its streams."""

from __future__ import annotations

from typing import Any, Protocol

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when a GPU is visible, else cpu; asking for cuda without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


class StreamOps(Protocol):
    """The stream and event calls the transfers make: CUDA's (`CudaStreams`), or a test's recording fake."""

    def side_stream(self) -> Any:
        """A new stream for copies, apart from compute."""
        ...

    def compute_stream(self) -> Any:
        """The stream compute is queued on (the caller's current stream)."""
        ...

    def record(self, stream: Any) -> Any:
        """An event after everything queued on `stream` so far."""
        ...

    def wait(self, stream: Any, event: Any) -> None:
        """Work queued on `stream` from now on starts after `event` (the host does not wait)."""
        ...

    def host_wait(self, event: Any) -> None:
        """The host waits for `event`."""
        ...

    def host_wait_stream(self, stream: Any) -> None:
        """The host waits for everything queued on `stream`."""
        ...

    def done(self, event: Any) -> bool:
        """Whether `event` has passed (a poll: never waits)."""
        ...

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue dst ← src (host memory) on `stream`; the host does not wait."""
        ...

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is page-locked (only those copy asynchronously)."""
        ...


class CudaStreams:
    """`StreamOps` on a CUDA device: torch.cuda streams and events, nothing else."""

    def __init__(self, device: torch.device):
        self.device = device

    def side_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def host_wait(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def host_wait_stream(self, stream: torch.cuda.Stream) -> None:
        stream.synchronize()

    def done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def copy(self, stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()
