"""Bug variants: kvmem's scenarios with one historic mistake each, patched into the real
code for the duration of an exploration. The checker must report each with a failing
schedule; that it does is the evidence the scenarios can fail.

Rules of this room:
- A variant changes exactly one step of one protocol, the way the mistake was made (in
  KVM's history or its reviews), and nothing else; production code paths are untouched
  outside `patch()`.
- A patch is a context manager that restores what it replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from ..mmu import Mmu
from ..slots import Change, Request
from ..vm import Vm
from . import sched
from .explore import Scenario
from .scenarios import SCENARIOS

__all__ = ["BUGS"]


@contextmanager
def _patched(owner: object, attr: str, value: object) -> Iterator[None]:
    old = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


def _range_add_last_only() -> AbstractContextManager[None]:
    """kvm_mmu_invalidate_range_add as first posted for gfn-based ranges: each call
    overwrote the range, so with two invalidations in flight only the last one's range
    made faults retry (found in review: "only the last range was recorded")."""

    def range_add(self: Mmu, start: int, end: int) -> None:
        self.lock.assert_held()
        if self.in_progress.load() <= 0:
            raise AssertionError("range_add outside an invalidation")
        self.range_start.store(start)
        self.range_end.store(end)

    return _patched(Mmu, "range_add", range_add)


def _batch_as_single_updates() -> AbstractContextManager[None]:
    """A VMM without atomic updates: a transaction's changes go to KVM one by one, delete
    then create (QEMU before 8.0; RHBZ 1979276)."""

    def apply_batch(self: Vm, requests: Sequence[Request]) -> list[Change]:
        for r in requests:
            self.set_memory_region(r.slot, r.flags, r.gpa, r.size, r.hva)
        return []

    return _patched(Vm, "_apply_batch", apply_batch)


def _no_grace_period() -> AbstractContextManager[None]:
    """A slot update that publishes the new slot set and returns without waiting for
    readers of the old one (synchronize_srcu left out of kvm_swap_active_memslots)."""
    real = sched.Srcu.synchronize

    def synchronize(self: sched.Srcu) -> None:
        if self.name != "vm.srcu":
            real(self)

    return _patched(sched.Srcu, "synchronize", synchronize)


def _variant(name: str, base: str, patch: Callable[[], AbstractContextManager[None]]
             ) -> tuple[str, Scenario]:
    scenario = SCENARIOS[base]
    doc = " ".join((patch.__doc__ or "").split())
    return name, Scenario(name, f"{base} with a historic mistake: {doc}", scenario.build,
                          patch, expect_failure=True)


BUGS: dict[str, Scenario] = dict([
    _variant("bug:range-add-keeps-last", "overlapping-invalidations", _range_add_last_only),
    _variant("bug:delete-then-create", "transaction-vs-reader", _batch_as_single_updates),
    _variant("bug:no-grace-period", "delete-vs-accessor", _no_grace_period),
])
