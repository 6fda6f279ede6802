"""The atomic-update demonstration (KVM's 2022 "atomic memslot updates" problem).

A guest (`loop`) keeps writing a counter to one page and reading it back while the host
splits the slot under that page in two and merges it back, again and again — what a VMM
does when it carves a region out of RAM (a device BAR, a ROM, a balloon) and puts it
back. Done as kvmem transactions, the guest never notices. Done as KVM users have to do
it without them — delete the slot, then create the pieces — the guest falls into the hole
between the two ioctls: its accesses become MMIO exits the VMM did not expect (and a read
that exits returns garbage: a torn access the guest reports on port 0x11).

`run(engine, rounds, surgery)` returns the counts, for `TRANSACTIONS` or `NAIVE` (the two
ways of doing the surgery); tests assert the transactional figures and report the naive
ones, `kvmem demo` shows both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..host import HostMemory
from ..uapi import PAGE_SIZE
from ..vm import Vm
from . import ExitKind, Regs

__all__ = ["CODE_GPA", "DATA_GPA", "DATA_PAGES", "NAIVE", "TRANSACTIONS", "Outcome", "Surgery",
           "run"]

CODE_GPA = 0x1000
DATA_GPA = 0x100000  # the data slot: DATA_PAGES pages; the guest's page is in the middle
DATA_PAGES = 64
CUT = DATA_GPA + DATA_PAGES // 2 * PAGE_SIZE


@dataclass(frozen=True)
class Surgery:
    """How the data slot is split in two and merged back."""

    name: str
    split: Callable[[Vm, HostMemory], None]
    merge: Callable[[Vm, HostMemory], None]


@dataclass
class Outcome:
    engine: str
    surgery: str
    rounds: int = 0  # split + merge pairs done
    unexpected_mmio: int = 0
    torn: int = 0
    internal_errors: int = 0
    iterations: int = 0
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)  # one per split or merge

    @property
    def clean(self) -> bool:
        return self.unexpected_mmio == 0 and self.torn == 0 and self.internal_errors == 0


def run(engine: str, rounds: int, surgery: Surgery | None = None,
        into: Outcome | None = None) -> Outcome:
    """Run `loop` on a fresh VM of `engine` while splitting and merging its data slot
    `rounds` times by `surgery` (default: `TRANSACTIONS`).
    Counts go to `into` (a new `Outcome` by default) as they happen, so another thread can
    watch them."""
    from ..guests import PORT_TORN, program

    surgery = TRANSACTIONS if surgery is None else surgery
    out = into if into is not None else Outcome(engine, surgery.name)
    code = HostMemory.anonymous(16 * PAGE_SIZE)
    data = HostMemory.anonymous(DATA_PAGES * PAGE_SIZE)
    vm = Vm(engine=engine)
    assert vm.engine is not None
    try:
        vm.set_memory_region(0, 0, 0, code.size, code.hva)
        vm.set_memory_region(1, 0, DATA_GPA, data.size, data.hva)
        vm.write(CODE_GPA, program("loop"))
        cpu = vm.create_vcpu(0)
        cpu.start(CODE_GPA, Regs(esi=CUT, ecx=0, ebx=0))
        started = threading.Event()
        failure: list[BaseException] = []

        def guest() -> None:
            try:
                started.set()
                while True:
                    e = cpu.run()
                    if e.kind is ExitKind.KICKED:
                        return
                    if e.kind is ExitKind.IO and e.addr == PORT_TORN:
                        out.torn += 1
                    elif e.kind is ExitKind.MMIO:
                        out.unexpected_mmio += 1
                        if e.reads:
                            cpu.complete(bytes(e.size))  # what a hole reads as
                    elif e.kind is ExitKind.INTERNAL_ERROR:
                        out.internal_errors += 1
                        return
                    else:
                        out.internal_errors += 1
                        return
            except BaseException as e:  # reported by the caller
                failure.append(e)

        thread = threading.Thread(target=guest, name="kvmem-atomic-guest", daemon=True)
        thread.start()
        started.wait()
        time.sleep(0.01)  # let the guest get going
        t0 = time.perf_counter()
        for _ in range(rounds):
            if not thread.is_alive():
                break
            t = time.perf_counter_ns()
            surgery.split(vm, data)
            out.latencies_ns.append(time.perf_counter_ns() - t)
            t = time.perf_counter_ns()
            surgery.merge(vm, data)
            out.latencies_ns.append(time.perf_counter_ns() - t)
            out.rounds += 1
        out.seconds = time.perf_counter() - t0
        cpu.kick()
        thread.join(timeout=30)
        if failure:
            raise failure[0]
        out.iterations = cpu.get_regs().ebx
        return out
    finally:
        vm.engine.close()
        code.close()
        data.close()


def _split_tx(vm: Vm, data: HostMemory) -> None:
    with vm.transaction() as tx:
        tx.split(1, [CUT], ids=[2])


def _merge_tx(vm: Vm, data: HostMemory) -> None:
    with vm.transaction() as tx:
        tx.merge([1, 2])


def _split_naive(vm: Vm, data: HostMemory) -> None:
    half = data.size // 2
    vm.set_memory_region(1, 0, 0, 0, 0)
    vm.set_memory_region(1, 0, DATA_GPA, half, data.hva)
    vm.set_memory_region(2, 0, CUT, half, data.hva + half)


def _merge_naive(vm: Vm, data: HostMemory) -> None:
    vm.set_memory_region(1, 0, 0, 0, 0)
    vm.set_memory_region(2, 0, 0, 0, 0)
    vm.set_memory_region(1, 0, DATA_GPA, data.size, data.hva)


TRANSACTIONS = Surgery("transactions", _split_tx, _merge_tx)
NAIVE = Surgery("naive", _split_naive, _merge_naive)  # delete, then create: KVM's API alone
