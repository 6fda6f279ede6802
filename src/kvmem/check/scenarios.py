"""The scenarios `kvmem check` explores: kvmem's own protocols, run by the real code.

Rules of this room:
- A scenario calls only kvmem's public paths (`Vm`, `Vcpu`, `HostMemory`, transactions,
  pfn caches, page tracking) — never a re-implementation. Its threads are as short as
  the race needs: every scheduling point multiplies the schedules to run.
- Each thread asserts what DESIGN.md's invariants promise at the moment it can see them
  (a reader never sees a hole; nothing returns data written after a delete returned), and
  the final check asserts what must hold once every thread is done (no stage-2 or cache
  entry maps a page that a host change replaced).
- Bug variants (`bugs.py`) reuse these scenarios with one historic mistake patched into
  the code they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from .. import host
from ..errors import GuestAccessError
from ..host import HostMemory
from ..mmu import Mmu
from ..vm import Vm
from . import sched
from .explore import Instance, Scenario

__all__ = ["SCENARIOS", "close_memory", "label", "stale_sptes"]

PAGE = 4096


def label(obj: object, prefix: str) -> None:
    """Name the twin atomics of `obj` after their attributes, for readable traces."""
    for attr, v in vars(obj).items():
        if isinstance(v, sched.Atomic) and v.name == "atomic":
            v.name = f"{prefix}.{attr.lstrip('_')}"


def new_vm() -> Vm:
    vm = Vm(address_spaces=1)
    label(vm, "vm")
    label(vm.mmu, "mmu")
    return vm


def close_memory(*mems: HostMemory) -> None:
    """Unmap scenario memory, even after an execution was cut short with locks held."""
    for mem in mems:
        try:
            mem.close()
        except Exception:
            if not mem.closed:
                with host._table_lock:
                    host._republish(mem, ())
                mem._closed = True
                host._munmap(mem.hva, mem.size)


def stale_sptes(mmu: Mmu) -> list[int]:
    """gfns whose stage-2 mapping points at a host page that has been replaced since."""
    out = []
    for small, huge in zip(mmu._small, mmu._huge, strict=True):
        out += [g for g, s in small.items() if not s.current(g)]
        out += [s.gfn for s in huge.values() if not s.current(s.gfn)]
    return out


def _check_stage2(vm: Vm) -> None:
    stale = stale_sptes(vm.mmu)
    assert not stale, f"stage-2 still maps replaced host pages at gfns {stale}"
    assert vm.mmu.stats["stale_uses"] == 0, "a vCPU used an spte whose host page was replaced"


def _memory(data: bytes, pages: int = 1) -> HostMemory:
    mem = HostMemory.anonymous(pages * PAGE)
    for i in range(pages):
        mem.view()[i * PAGE:i * PAGE + len(data)] = data
    return mem


# ---------------------------------------------------------------------------------------
# fault vs invalidation


def fault_vs_invalidation() -> Instance:
    """A vCPU faults a page in while the host discards it: whatever the order, no stale
    spte survives the invalidation and the guest reads the old or the new page."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    got: list[bytes] = []

    def guest() -> None:
        got.append(vcpu.guest_read(0, 8))

    def discard() -> None:
        mem.discard(0, PAGE)

    def check() -> None:
        _check_stage2(vm)
        assert got and got[0] in (b"original", bytes(8)), f"guest read {got}"

    return Instance([("vcpu0", guest), ("host", discard)], check, lambda: close_memory(mem))


def overlapping_invalidations() -> Instance:
    """Two invalidations overlap — the host discards gfn 0's page (an MMU notifier) while
    the VMM zaps gfn 1 (kvm_zap_gfn_range) — and a vCPU faults gfn 0: the in-progress range
    must cover both until both end, so the fault cannot install the page being replaced."""
    mem = _memory(b"page 0..", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)

    def discard() -> None:
        mem.discard(0, PAGE)

    def zap() -> None:
        vm.mmu.zap_gfn_range(0, 1, 2)

    def guest() -> None:
        vcpu.guest_read(0, 8)

    return Instance([("host", discard), ("zap", zap), ("vcpu0", guest)],
                    lambda: _check_stage2(vm), lambda: close_memory(mem))


# ---------------------------------------------------------------------------------------
# slot updates


def transaction_vs_reader() -> Instance:
    """A transaction splits a two-page slot in two while a reader reads both pages: the
    reader sees the old layout or the new one, never a hole."""
    mem = _memory(b"contents", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, mem.hva)

    def split() -> None:
        with vm.transaction() as tx:
            tx.split(0, [PAGE])

    def reader() -> None:
        try:
            data = vm.read(0, 2 * PAGE)
        except GuestAccessError as e:
            raise AssertionError(f"reader saw a hole during a transaction: {e}") from None
        assert data[:8] == data[PAGE:PAGE + 8] == b"contents", "reader got wrong bytes"

    def check() -> None:
        assert [s.npages for s in vm.slots()] == [1, 1], vm.slots()

    return Instance([("vmm", split), ("reader", reader)], check, lambda: close_memory(mem))


POISON = b"REUSED!!"


def delete_vs_accessor() -> Instance:
    """A slot is deleted while a reader reads through it; once the delete returns, the VMM
    reuses the host memory. The reader must get the old bytes or EFAULT — never bytes
    written after the delete returned (that would be a use of the old mapping)."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)

    def delete() -> None:
        vm.set_memory_region(0, 0, 0, 0, 0)
        mem.view()[:8] = POISON  # the slot is gone: its memory is the VMM's again

    def reader() -> None:
        with contextlib.suppress(GuestAccessError):
            data = vm.read(0, 8)
            assert data != POISON, "reader used the deleted slot's mapping after the " \
                                   "delete returned"
            assert data == b"original", f"reader got {data!r}"

    return Instance([("vmm", delete), ("reader", reader)], close=lambda: close_memory(mem))


def _scenarios(*items: tuple[str, Callable[[], Instance]]) -> dict[str, Scenario]:
    out = {}
    for name, build in items:
        doc = (build.__doc__ or "").split("\n\n")[0]
        out[name] = Scenario(name, " ".join(doc.split()), build)
    return out


SCENARIOS: dict[str, Scenario] = _scenarios(
    ("fault-vs-invalidation", fault_vs_invalidation),
    ("overlapping-invalidations", overlapping_invalidations),
    ("transaction-vs-reader", transaction_vs_reader),
    ("delete-vs-accessor", delete_vs_accessor),
)
