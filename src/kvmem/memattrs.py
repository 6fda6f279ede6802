"""Memory attributes of a VM's gfns: what KVM_SET_MEMORY_ATTRIBUTES stores (kvm-semantics §8.6).

Defines `AttributeMap` — an immutable map gfn → attributes (KVM's `mem_attr_array`), kept
as sorted disjoint runs so that a conversion of any size is one run — and the uapi numbers
`KVM_MEMORY_ATTRIBUTE_PRIVATE`, `KVM_MEMORY_EXIT_FLAG_PRIVATE`, `VM_TYPES`.

Rules of this room:
- Attributes belong to gfns of the VM, not to slots: a map knows nothing of slots, the MMU
  or files. Who changes it (the VM, under slots_lock) runs the invalidation around the
  change; readers (the fault path) load the published map without a lock.
- A gfn with no stored entry has attributes 0 (shared); value 0 is never stored (KVM erases
  the xarray entry), so equal maps have equal runs.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

__all__ = [
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "VM_TYPES",
    "AttributeMap",
]

KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3  # bits 0-2 are kept for RWX
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3  # run->memory_fault.flags

# x86 VM types kvmem models: name → (KVM_X86_*_VM number, has private memory). This host's
# KVM offers only the default type (KVM_CAP_VM_TYPES = 1); "sw_protected" is modelled.
VM_TYPES: Final[dict[str, tuple[int, bool]]] = {
    "default": (0, False),
    "sw_protected": (1, True),
}


class AttributeMap:
    """gfn → attributes as sorted disjoint runs (start, end, value), value != 0."""

    __slots__ = ("runs", "starts")

    def __init__(self, runs: tuple[tuple[int, int, int], ...] = ()) -> None:
        self.runs = runs
        self.starts = tuple(r[0] for r in runs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AttributeMap) and self.runs == other.runs

    def __hash__(self) -> int:
        return hash(self.runs)

    def __repr__(self) -> str:
        return "AttributeMap(" + ", ".join(f"[{s:#x}, {e:#x}): {v:#x}"
                                           for s, e, v in self.runs) + ")"

    def get(self, gfn: int) -> int:
        """kvm_get_memory_attributes: the attributes of `gfn` (0 where none are stored)."""
        i = bisect_right(self.starts, gfn) - 1
        if i >= 0 and gfn < self.runs[i][1]:
            return self.runs[i][2]
        return 0

    def _overlapping(self, start: int, end: int) -> list[tuple[int, int, int]]:
        i = max(bisect_right(self.starts, start) - 1, 0)
        out = []
        for run in self.runs[i:]:
            if run[0] >= end:
                break
            if run[1] > start:
                out.append(run)
        return out

    def has(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """kvm_range_has_memory_attributes: every gfn of [start, end) has `attrs` within
        `mask`; attrs outside mask → False; attrs 0 → no gfn has any bit of `mask`."""
        if attrs & ~mask:
            return False
        pos = start
        for s, e, v in self._overlapping(start, end):
            if s > pos and attrs:  # a gap of zeros inside the range
                return False
            if v & mask != attrs:
                return False
            pos = e
        return pos >= end or not attrs

    def uniform(self, start: int, end: int) -> bool:
        """All gfns of [start, end) have the same attributes (KVM's "not mixed")."""
        runs = self._overlapping(start, end)
        if not runs:
            return True
        s, e, _ = runs[0]
        return len(runs) == 1 and s <= start and e >= end

    def with_range(self, start: int, end: int, value: int) -> AttributeMap:
        """This map with gfns [start, end) set to `value` (0 erases)."""
        runs: list[tuple[int, int, int]] = []
        for s, e, v in self.runs:
            if e <= start or s >= end:
                runs.append((s, e, v))
                continue
            if s < start:
                runs.append((s, start, v))
            if e > end:
                runs.append((end, e, v))
        if value:
            runs.append((start, end, value))
        runs.sort()
        merged: list[tuple[int, int, int]] = []
        for run in runs:  # adjacent runs of one value are one run
            if merged and merged[-1][1] == run[0] and merged[-1][2] == run[2]:
                merged[-1] = (merged[-1][0], run[1], run[2])
            else:
                merged.append(run)
        return AttributeMap(tuple(merged))
