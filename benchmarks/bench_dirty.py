"""Dirty logging under a running guest: the per-page cost of a write fault after a harvest, on
each engine, beside the raw cost of write-protecting one page.

A guest (`walker`, one word per page, one pass: a store then a load on every page) runs
over a dirty-logging slot of N pages. Each round runs it twice: once with every page
writable (no harvest before it), once after `vm.get_dirty_log` (every page write-protected
again, so every store faults). A subject sample is what the harvest and the second run cost
beyond the first, over N: one page's share of a harvest and its write fault after it,
everything included — for Unicorn the re-protect of the page (left by the harvest to the
next run), the fault through kvmem's MMU, the mapping made writable again and the store run
again; for KVM the harvest's ioctls and kvmem's bitmaps, and the fault KVM takes (kvmem is
not on that path). Samples are CPU time of the process (all threads, user + system), not
wall time: the machine is shared. Baselines, measured in the same run, interleaved:

- `unicorn_fault_after_harvest` (target <= 4): vs one raw Unicorn `mem_protect` of one page
  (read-only and back, alternately) on a bare Uc holding N + 1 one-page regions — what a
  mirror with a region per page pays per protection change (Unicorn's cost of a change
  grows with its number of regions), and two such changes (the harvest's and the fault's)
  per page was the floor of such a mirror. The engine's mirror keeps a few regions per
  64-page chunk instead (engines/unicorn.py, "Regions"): a harvest protects a chunk's
  region whole, and a fault re-cuts its chunk (about four map/unmap calls over few
  regions).
- `kvm_fault_after_harvest` (target <= 1): vs one raw `mprotect(2)` of one host page
  (read-only and back, alternately): a harvest and the fault after it cost a page less than
  write-protecting it with a system call would. (On this host KVM emulates the guest's
  ring-0 code; the fault itself is KVM's and is lost in that noise.)

    python benchmarks/bench_dirty.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import sys
import time
from collections.abc import Callable

import _common as C
from unicorn.unicorn import Uc
from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
)

import kvmem
from kvmem import kvmapi
from kvmem.engines import ExitKind, Regs
from kvmem.guests import program

PAGE = 4096
CODE = 0x1000
DATA = 0x100000


class Guest:
    """`walker` over a logging slot of `npages` on `engine`; `run()` runs it once."""

    def __init__(self, engine: str, npages: int) -> None:
        self.npages = npages
        self.code = kvmem.HostMemory.anonymous(16 * PAGE)
        self.data = kvmem.HostMemory.anonymous(npages * PAGE)
        self.vm = kvmem.Vm(engine=engine)
        vm = self.vm
        vm.set_memory_region(0, 0, 0, self.code.size, self.code.hva)
        vm.set_memory_region(1, kvmem.KVM_MEM_LOG_DIRTY_PAGES, DATA, self.data.size,
                             self.data.hva)
        vm.write(CODE, program("walker"))
        assert vm.engine is not None
        self.cpu = vm.create_vcpu(0)
        self.regs = Regs(esi=DATA, ecx=self.data.size, edi=PAGE, ebx=0x5EED, ebp=1)

    def run(self) -> None:
        self.cpu.start(CODE, self.regs)
        e = self.cpu.run()
        assert e.kind is ExitKind.IO, e
        e = self.cpu.run()
        assert e.kind is ExitKind.HLT, e

    def harvest(self) -> None:
        self.vm.get_dirty_log(1)

    def close(self) -> None:
        assert self.vm.engine is not None
        self.vm.engine.close()
        self.code.close()
        self.data.close()


# CPU time of the process (all its threads, user and system: the vCPU thread, KVM_RUN
# included), not wall time: on a shared machine a run of milliseconds is preempted often,
# and what is measured is the work done
now_cpu_ns = time.process_time_ns


def fault_samples(guest: Guest, rounds: int, baseline: Callable[[], float]
                  ) -> tuple[list[float], list[float]]:
    """Per round: a run with every page writable, then a harvest and a run after it (what
    these cost beyond the first run, over N, is one subject sample), and one baseline
    sample."""
    guest.run()  # every page mapped
    guest.harvest()
    guest.run()
    subject: list[float] = []
    base: list[float] = []
    for r in range(rounds + 1):
        t0 = now_cpu_ns()
        guest.run()
        t1 = now_cpu_ns()
        guest.harvest()
        guest.run()
        t3 = now_cpu_ns()
        b = baseline()
        if r:  # the first round warms up
            # at least 1 ns a page: a difference lost in noise (KVM's) is not <= 0
            subject.append(max((t3 - t1) - (t1 - t0), guest.npages) / guest.npages)
            base.append(b)
    return subject, base


class RawUcProtect:
    """A bare Uc with `nregions` one-page regions; `sample()` times `ops` protection
    changes of one page (read-only, then back), ns each."""

    def __init__(self, nregions: int, ops: int) -> None:
        self.mem = mmap.mmap(-1, nregions * PAGE)
        self.buf = ctypes.c_char.from_buffer(self.mem)
        base = ctypes.addressof(self.buf)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        for i in range(nregions):
            self.uc.mem_map_ptr(DATA + i * PAGE, PAGE, UC_PROT_ALL, base + i * PAGE)
        self.nregions, self.ops, self.k = nregions, ops, 0

    def sample(self) -> float:
        uc, n = self.uc, self.nregions
        t0 = now_cpu_ns()
        for _ in range(self.ops):
            page = DATA + (self.k % n) * PAGE
            uc.mem_protect(page, PAGE, UC_PROT_READ | UC_PROT_EXEC)
            uc.mem_protect(page, PAGE, UC_PROT_ALL)
            self.k += 1
        return (now_cpu_ns() - t0) / (2 * self.ops)

    def close(self) -> None:
        del self.uc, self.buf
        self.mem.close()


class RawMprotect:
    """`sample()` times `ops` mprotect(2) calls on one host page (read-only, then back)."""

    def __init__(self, ops: int) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.mprotect = libc.mprotect
        self.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.mem = kvmem.HostMemory.anonymous(PAGE)
        self.mem.view()[0] = 1  # populated
        self.ops = ops

    def sample(self) -> float:
        mprotect, hva = self.mprotect, self.mem.hva
        t0 = now_cpu_ns()
        for _ in range(self.ops):
            mprotect(hva, PAGE, 1)  # PROT_READ
            mprotect(hva, PAGE, 3)  # PROT_READ | PROT_WRITE
        return (now_cpu_ns() - t0) / (2 * self.ops)

    def close(self) -> None:
        self.mem.close()


def bench_unicorn(rep: C.Report, npages: int, rounds: int) -> None:
    guest = Guest("unicorn", npages)
    raw = RawUcProtect(npages + 1, 20)
    try:
        subject, base = fault_samples(guest, rounds, raw.sample)
    finally:
        guest.close()
        raw.close()
    rep.add(C.Figure(f"Unicorn write fault after a harvest, {npages} hot pages (per page) / "
                     f"raw mem_protect of one page", subject, base, target=4.0,
                     subject_label="vm.get_dirty_log + run after it minus a run, per page",
                     baseline_label=f"Uc.mem_protect of one page, {npages + 1} regions mapped",
                     id="unicorn_fault_after_harvest",
                     note="2 was the floor of a mirror with one region per page"))


def bench_kvm(rep: C.Report, npages: int, rounds: int) -> None:
    guest = Guest("kvm", npages)
    raw = RawMprotect(200)
    try:
        subject, base = fault_samples(guest, rounds, raw.sample)
    finally:
        guest.close()
        raw.close()
    rep.add(C.Figure(f"KVM write fault after a harvest, {npages} hot pages (per page) / "
                     f"raw mprotect of one page", subject, base, target=1.0,
                     subject_label="vm.get_dirty_log + run after it minus a run, per page",
                     baseline_label="mprotect(2) of one host page",
                     id="kvm_fault_after_harvest",
                     note="KVM's own fault (ring-0 guest code emulated on this host); "
                          "kvmem is not on its path"))


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_dirty", "dirty logging: a write fault after a harvest, per page",
                   args.quick)
    npages = 200 if args.quick else 2000
    rounds = 3 if args.quick else 7
    rep.params = {"hot_pages": npages, "rounds": rounds}
    why_not = kvmapi.kvm_available()
    C.quiet_gc()
    try:
        bench_unicorn(rep, npages, rounds)
        if why_not is None:
            bench_kvm(rep, npages, rounds)
        else:
            rep.notes.append(f"KVM figure skipped: {why_not}")
    finally:
        gc.enable()
    rep.params["kvm"] = "yes" if why_not is None else f"skipped: {why_not}"
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
