"""The atomic-update demonstration (KVM's 2022 "atomic memslot updates" problem).

A guest (`loop`) keeps writing a counter to one page and reading it back while the host
splits the slot under that page in two and merges it back, again and again — what a VMM
does when it carves a region out of RAM (a device BAR, a ROM, a balloon) and puts it
back. Done as kvmem transactions, the guest never notices. Done as KVM users have to do
it without them — delete the slot, then create the pieces — the guest falls into the hole
between the two ioctls: its accesses become MMIO exits the VMM did not expect (and a read
that exits returns garbage: a torn access the guest reports on port 0x11).

`run(engine, rounds, naive)` returns the counts; tests assert the transactional figures
and report the naive ones, `kvmem demo` shows both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..host import HostMemory
from ..uapi import PAGE_SIZE
from ..vm import Vm
from . import ExitKind, Regs

__all__ = ["CODE_GPA", "DATA_GPA", "DATA_PAGES", "Outcome", "run"]

CODE_GPA = 0x1000
DATA_GPA = 0x100000  # the data slot: DATA_PAGES pages; the guest's page is in the middle
DATA_PAGES = 64
CUT = DATA_GPA + DATA_PAGES // 2 * PAGE_SIZE


@dataclass
class Outcome:
    engine: str
    naive: bool
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


def run(engine: str, rounds: int, naive: bool = False,
        into: Outcome | None = None) -> Outcome:
    """Run `loop` on a fresh VM of `engine` while splitting and merging its data slot
    `rounds` times — with transactions, or with the naive delete-then-create sequence.
    Counts go to `into` (a new `Outcome` by default) as they happen, so another thread can
    watch them."""
    from ..guests import PORT_TORN, program

    out = into if into is not None else Outcome(engine, naive)
    code = HostMemory.anonymous(16 * PAGE_SIZE)
    data = HostMemory.anonymous(DATA_PAGES * PAGE_SIZE)
    vm = Vm(engine=engine)
    assert vm.engine is not None
    try:
        vm.set_memory_region(0, 0, 0, code.size, code.hva)
        vm.set_memory_region(1, 0, DATA_GPA, data.size, data.hva)
        vm.write(CODE_GPA, program("loop"))
        cpu = vm.engine.create_vcpu(0)
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
            _split(vm, data, naive)
            out.latencies_ns.append(time.perf_counter_ns() - t)
            t = time.perf_counter_ns()
            _merge(vm, data, naive)
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


def _split(vm: Vm, data: HostMemory, naive: bool) -> None:
    half = data.size // 2
    if naive:
        vm.set_memory_region(1, 0, 0, 0, 0)
        vm.set_memory_region(1, 0, DATA_GPA, half, data.hva)
        vm.set_memory_region(2, 0, CUT, half, data.hva + half)
    else:
        with vm.transaction() as tx:
            tx.split(1, [CUT], ids=[2])


def _merge(vm: Vm, data: HostMemory, naive: bool) -> None:
    if naive:
        vm.set_memory_region(1, 0, 0, 0, 0)
        vm.set_memory_region(2, 0, 0, 0, 0)
        vm.set_memory_region(1, 0, DATA_GPA, data.size, data.hva)
    else:
        with vm.transaction() as tx:
            tx.merge([1, 2])
