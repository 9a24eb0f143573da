"""How many expert slots the device gets: given as experts or bytes, half of all experts, or `auto` — what the
device has free after the dense weights, less the activations of the largest batch, measured."""

from __future__ import annotations

from dataclasses import dataclass

AUTO_MARGIN = 1.25  # the measured activation peak is scaled by this before it is kept free
AUTO_RESERVE = 256 << 20  # bytes of the device's free memory auto never takes: allocator slack, the OS
BUDGETS = ("auto", "half")


@dataclass(frozen=True)
class BudgetDecision:
    """The number of slots and how it was reached, in one line for the log and `/info`."""

    slots: int
    source: str  # "experts" | "bytes" | "half" | "auto"
    reason: str


def explicit_budget(
    budget: str, budget_experts: int | None, budget_bytes: int | None, expert_bytes: int, total_experts: int
) -> BudgetDecision | None:
    """The slots of an explicit budget or of "half"; None for "auto", which needs a measurement. Clear errors for
    budgets that cannot work."""
    if budget_experts is not None and budget_bytes is not None:
        raise ValueError("give the expert budget as experts or as bytes, not both")
    if budget_experts is not None:
        if budget_experts < 1:
            raise ValueError(f"expert budget must be at least 1 expert, got {budget_experts}")
        slots = min(budget_experts, total_experts)
        return BudgetDecision(slots, "experts", f"{slots} of {total_experts} experts, as asked")
    if budget_bytes is not None:
        if budget_bytes < expert_bytes:
            raise ValueError(f"expert budget of {budget_bytes} bytes is below one expert ({expert_bytes} bytes)")
        slots = min(budget_bytes // expert_bytes, total_experts)
        return BudgetDecision(slots, "bytes", f"{slots} of {total_experts} experts in {budget_bytes} bytes")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {', '.join(BUDGETS)}")
    if budget == "half":
        slots = max(1, (total_experts + 1) // 2)
        return BudgetDecision(slots, "half", f"{slots} of {total_experts} experts (half)")
    return None


def auto_budget(
    free_bytes: int, headroom_bytes: int, expert_bytes: int, total_experts: int, held: int
) -> BudgetDecision:
    """Slots for what is free (`free_bytes`, the reserve already taken off) once the measured activation headroom
    is kept aside; `held` slots already allocated count in. Never fewer than `held`, never more than every
    expert."""
    keep = int(headroom_bytes * AUTO_MARGIN)
    more = max(0, free_bytes - keep) // expert_bytes
    slots = min(total_experts, held + more)
    mib = 2**20
    return BudgetDecision(
        slots,
        "auto",
        f"{slots} of {total_experts} experts: {free_bytes / mib:.0f} MiB free, {keep / mib:.0f} MiB kept for "
        f"activations ({headroom_bytes / mib:.0f} MiB measured), {expert_bytes / mib:.2f} MiB each",
    )
