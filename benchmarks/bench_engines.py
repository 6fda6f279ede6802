"""Engines: KVM transaction latency with a vCPU running, Unicorn throughput on kvmem's MMU,
dirty-log harvest through the KVM engine.

Figures (each against a baseline measured in the same run, interleaved round by round):
- `tx_split` / `tx_merge` (KVM, info): a kvmem transaction that splits a 64-page slot in
  two (merges it back) on `Vm(engine="kvm")` while a vCPU runs the `loop` guest on the
  page under the cut — kick, hold, ioctls, resume — vs the same ioctls (delete + 2 creates;
  2 deletes + create) issued raw on a KVM VM whose vCPU runs the same guest unheld.
- `unicorn_walker` (throughput, target ≥ 0.9): the `walker` guest over RAM (every word)
  on `Vm(engine="unicorn")`, where nothing is mapped until touched, after one warm-up
  run — vs a bare Unicorn with all RAM mapped up front running the same binary, over the
  same host memory (so that both run on the same host backing of it).
- `unicorn_mmio_exit` (info): the `walker` guest over a page without memory on
  `Vm(engine="unicorn")` — every load and store an MMIO exit the VMM answers from a
  bytearray (a block-wise run stops at the access, the instruction runs again alone:
  emu_start with count=1 and memory hooks, then run() returns) — vs a bare Unicorn whose
  `mmio_map` callbacks answer the same accesses inline. Per access.
- `unicorn_exact_step` (info): the same guest over a write-tracked page (every access an
  exact step, no exit: the cost of the step alone) vs over RAM on the same engine
  (block-wise, after warm-up). Per access.
  Unicorn drops every translated block when a run without an instruction count follows
  one with it (uc_emu_start deletes its count hook and calls tb_flush); the engine's
  block-wise runs after a step keep the count hook instead (see its "exact steps").
- `harvest` (KVM, info): `vm.get_dirty_log` of a 64 MiB logging slot (KVM's log read,
  folded into kvmem's bitmap and cleared, kvmem's bitmap harvested) vs one raw
  KVM_GET_DIRTY_LOG on a VM with the same slot.

    python benchmarks/bench_engines.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal
import sys
import threading
from typing import Any

import _common as C
from unicorn.unicorn import Uc
from unicorn.unicorn_const import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32, UC_PROT_ALL
from unicorn.x86_const import (
    UC_X86_INS_OUT,
    UC_X86_REG_EBP,
    UC_X86_REG_EBX,
    UC_X86_REG_ECX,
    UC_X86_REG_EDI,
    UC_X86_REG_ESI,
)

import kvmem
from kvmem import kvmapi
from kvmem.engines import ExitKind, Regs
from kvmem.engines.kvm import KICK_SIGNAL, _flat
from kvmem.guests import program

PAGE = 4096
CODE = 0x1000
DATA = 0x100000
DATA_PAGES = 64
CUT = DATA + DATA_PAGES // 2 * PAGE


# -- KVM transaction latency ---------------------------------------------------------------
class KvmTx:
    """kvmem on the KVM engine, a vCPU running `loop` on the page under the cut."""

    def __init__(self) -> None:
        self.code = kvmem.HostMemory.anonymous(16 * PAGE)
        self.data = kvmem.HostMemory.anonymous(DATA_PAGES * PAGE)
        self.vm = kvmem.Vm(engine="kvm")
        vm = self.vm
        vm.set_memory_region(0, 0, 0, self.code.size, self.code.hva)
        vm.set_memory_region(1, 0, DATA, self.data.size, self.data.hva)
        vm.write(CODE, program("loop"))
        assert vm.engine is not None
        self.cpu = vm.create_vcpu(0)
        self.cpu.start(CODE, Regs(esi=CUT, ecx=0))
        self.thread = threading.Thread(target=self._guest, daemon=True)
        self.thread.start()

    def _guest(self) -> None:
        while True:
            e = self.cpu.run()
            if e.kind is ExitKind.KICKED:
                return
            if e.reads:
                self.cpu.complete(bytes(e.size))

    def split(self) -> None:
        with self.vm.transaction() as tx:
            tx.split(1, [CUT], ids=[2])

    def merge(self) -> None:
        with self.vm.transaction() as tx:
            tx.merge([1, 2])

    def close(self) -> None:
        self.cpu.kick()
        self.thread.join(timeout=10)
        assert self.vm.engine is not None
        self.vm.engine.close()
        self.code.close()
        self.data.close()


class RawTx:
    """The same slots and guest on a raw KVM VM; splits and merges as bare ioctls."""

    def __init__(self) -> None:
        self.code = kvmem.HostMemory.anonymous(16 * PAGE)
        self.data = kvmem.HostMemory.anonymous(DATA_PAGES * PAGE)
        self.kvm = kvmapi.Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_user_memory_region(0, 0, 0, self.code.size, self.code.hva)
        self.vm.set_user_memory_region(1, 0, DATA, self.data.size, self.data.hva)
        self.code.view()[CODE:CODE + len(program("loop"))] = program("loop")
        self.cpu = self.vm.create_vcpu(0)
        sregs = self.cpu.get_sregs()
        sregs.cs = _flat(0x08, 11)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat(0x10, 3))
        sregs.cr0 = 0x11
        self.cpu.set_sregs(sregs)
        self.cpu.set_regs(kvmapi.KvmRegs(rsi=CUT, rip=CODE))
        self.stop = False
        self.thread = threading.Thread(target=self._guest, daemon=True)
        self.thread.start()

    def _guest(self) -> None:
        while not self.stop:
            with contextlib.suppress(InterruptedError):  # the stop's kick
                self.cpu.run()  # MMIO exits of the raw sequence's hole: reads see zeros

    def split(self) -> None:
        half = self.data.size // 2
        self.vm.set_user_memory_region(1, 0, 0, 0, 0)
        self.vm.set_user_memory_region(1, 0, DATA, half, self.data.hva)
        self.vm.set_user_memory_region(2, 0, CUT, half, self.data.hva + half)

    def merge(self) -> None:
        self.vm.set_user_memory_region(1, 0, 0, 0, 0)
        self.vm.set_user_memory_region(2, 0, 0, 0, 0)
        self.vm.set_user_memory_region(1, 0, DATA, self.data.size, self.data.hva)

    def close(self) -> None:
        self.stop = True
        self.cpu.immediate_exit = True
        if self.thread.ident is not None:
            signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
        self.thread.join(timeout=10)
        self.cpu.close()
        self.vm.close()
        self.kvm.close()
        self.code.close()
        self.data.close()


def bench_transactions(rep: C.Report, rounds: int) -> None:
    kv, raw = KvmTx(), RawTx()
    try:
        state = {"kv": False, "raw": False}  # split?

        def step(subject: KvmTx | RawTx, key: str) -> None:
            if state[key]:
                subject.merge()
            else:
                subject.split()
            state[key] = not state[key]

        samples = C.interleave({"kv": (lambda r: step(kv, "kv"), 1),
                                "raw": (lambda r: step(raw, "raw"), 1)}, rounds * 2, warmup=2)
    finally:
        kv.close()
        raw.close()
    rep.add(C.Figure("KVM split/merge transaction, vCPU running / raw ioctls", samples["kv"],
                     samples["raw"], subject_label="kvmem transaction (kick, hold, ioctls, "
                     "resume)", baseline_label="3 raw KVM_SET_USER_MEMORY_REGION, vCPU unheld",
                     id="kvm_tx_vs_raw", note="the raw sequence leaves a hole the guest "
                     "can fall into; the transaction does not (tests/test_engines.py)"))


# -- Unicorn throughput -----------------------------------------------------------------------
def bench_unicorn(rep: C.Report, ram: int, rounds: int) -> None:
    walker = program("walker")
    regs = Regs(esi=0x10000, ecx=ram - 0x10000, edi=4, ebx=0x5EED, ebp=1)

    mem = kvmem.HostMemory.anonymous(ram)
    vm = kvmem.Vm(engine="unicorn")
    vm.set_memory_region(0, 0, 0, ram, mem.hva)
    vm.write(CODE, walker)
    assert vm.engine is not None
    cpu = vm.create_vcpu(0)

    def kvmem_run(r: int) -> None:
        cpu.start(CODE, regs)
        e = cpu.run()
        assert e.kind is ExitKind.IO, e
        assert cpu.run().kind is ExitKind.HLT

    # the bare Unicorn maps the same host memory: how the host backs it (huge pages or not)
    # changed the walker's speed by 1.6x here, from one allocation to the next
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map_ptr(0, ram, UC_PROT_ALL, ctypes.c_void_p(mem.hva).value)
    sums: list[int] = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, port, size, value, data: sums.append(value), None,
                1, 0, UC_X86_INS_OUT)

    def raw_run(r: int) -> None:
        for reg, v in ((UC_X86_REG_ESI, regs.esi), (UC_X86_REG_ECX, regs.ecx),
                       (UC_X86_REG_EDI, regs.edi), (UC_X86_REG_EBX, regs.ebx),
                       (UC_X86_REG_EBP, regs.ebp)):
            uc.reg_write(reg, v)
        uc.emu_start(CODE, 1 << 32)

    try:
        cpu.start(CODE, regs)  # warm-up: every page faults in once
        e = cpu.run()
        assert e.kind is ExitKind.IO and cpu.run().kind is ExitKind.HLT
        written = vm.read(0, ram)
        mem.view()[0x10000:] = bytes(ram - 0x10000)
        raw_run(0)
        assert sums == [int.from_bytes(e.data, "little")] and vm.read(0, ram) == written
        words = (ram - 0x10000) // 4
        samples = C.interleave({"kv": (kvmem_run, words), "raw": (raw_run, words)}, rounds)
    finally:
        vm.engine.close()
        mem.close()
    rep.add(C.Figure(f"Unicorn walker over {ram >> 20} MiB (per word), kvmem MMU / all mapped",
                     samples["kv"], samples["raw"], kind="throughput", target=0.9,
                     subject_label="Unicorn engine: kvmem's MMU as stage-2, after warm-up",
                     baseline_label="bare Unicorn, RAM mapped up front", id="unicorn_walker"))


# -- Unicorn slow accesses: exact steps --------------------------------------------------------
MMIO = 0x200000


class _NoTracker:
    def track_write(self, gpa: int, data: bytes) -> None:
        pass

    def track_remove_region(self, gfn: int, npages: int) -> None:
        pass


class StepGuest:
    """`walker` over one word per `words` at MMIO on `Vm(engine="unicorn")`: `kind` "mmio"
    (no slot there: every access exits), "tracked" (a write-tracked RAM page: every access
    an exact step) or "ram"."""

    def __init__(self, kind: str, words: int) -> None:
        self.code = kvmem.HostMemory.anonymous(16 * PAGE)
        self.data = kvmem.HostMemory.anonymous(PAGE)
        self.vm = kvmem.Vm(engine="unicorn")
        vm = self.vm
        vm.set_memory_region(0, 0, 0, self.code.size, self.code.hva)
        if kind != "mmio":
            vm.set_memory_region(1, 0, MMIO, self.data.size, self.data.hva)
        if kind == "tracked":
            vm.page_track.register(_NoTracker())
            vm.page_track.add_gfn(MMIO // PAGE)
        vm.write(CODE, program("walker"))
        self.cpu = vm.create_vcpu(0)
        self.regs = Regs(esi=MMIO, ecx=4 * words, edi=4, ebx=0x5EED, ebp=1)
        self.dev = bytearray(PAGE)
        self.result = b""

    def run(self, r: int = 0) -> None:
        cpu, dev = self.cpu, self.dev
        cpu.start(CODE, self.regs)
        while True:
            e = cpu.run()
            if e.kind is ExitKind.MMIO:
                at = e.addr - MMIO
                if e.is_write:
                    dev[at:at + e.size] = e.data
                else:
                    cpu.complete(bytes(dev[at:at + e.size]))
            elif e.kind is ExitKind.IO:
                self.result = e.data
            else:
                assert e.kind is ExitKind.HLT, e
                return

    def close(self) -> None:
        assert self.vm.engine is not None
        self.vm.engine.close()
        self.code.close()
        self.data.close()


class RawMmio:
    """The same guest on a bare Unicorn, its data page `mmio_map`ped: the callbacks answer
    every access from a bytearray."""

    def __init__(self, words: int) -> None:
        walker = program("walker")
        self.mem = kvmem.HostMemory.anonymous(16 * PAGE)
        self.mem.view()[CODE:CODE + len(walker)] = walker
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.uc.mem_map_ptr(0, self.mem.size, UC_PROT_ALL, self.mem.hva)
        dev = self.dev = bytearray(PAGE)

        def read(uc: Uc, offset: int, size: int, data: Any) -> int:
            return int.from_bytes(dev[offset:offset + size], "little")

        def write(uc: Uc, offset: int, size: int, value: int, data: Any) -> None:
            dev[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

        self.uc.mmio_map(MMIO, PAGE, read, None, write, None)
        self.out: list[int] = []
        self.uc.hook_add(UC_HOOK_INSN, lambda uc, port, size, value, data:
                         self.out.append(value), None, 1, 0, UC_X86_INS_OUT)
        self.words = words

    def run(self, r: int = 0) -> None:
        uc = self.uc
        for reg, v in ((UC_X86_REG_ESI, MMIO), (UC_X86_REG_ECX, 4 * self.words),
                       (UC_X86_REG_EDI, 4), (UC_X86_REG_EBX, 0x5EED), (UC_X86_REG_EBP, 1)):
            uc.reg_write(reg, v)
        uc.emu_start(CODE, 1 << 32)

    def close(self) -> None:
        del self.uc
        self.mem.close()


def bench_steps(rep: C.Report, words: int, rounds: int) -> None:
    mmio, tracked, ram = StepGuest("mmio", words), StepGuest("tracked", words), \
        StepGuest("ram", words)
    raw = RawMmio(words)
    try:
        for g in (mmio, tracked, ram):
            g.run()
        raw.run()
        assert mmio.result == tracked.result == ram.result == \
            raw.out[-1].to_bytes(4, "little"), (mmio.result, ram.result, raw.out)
        accesses = 2 * words  # a store and a load a word
        samples = C.interleave({"mmio": (mmio.run, accesses), "raw": (raw.run, accesses),
                                "tracked": (tracked.run, accesses),
                                "ram": (ram.run, accesses)}, rounds)
        assert mmio.vm.engine is not None
        steps = mmio.vm.engine.stats["steps"]
    finally:
        for g in (mmio, tracked, ram):
            g.close()
        raw.close()
    rep.add(C.Figure(f"Unicorn MMIO access, walker over {words} words (per access), "
                     f"kvmem exit / raw mmio_map", samples["mmio"], samples["raw"],
                     subject_label="Unicorn engine: stop, exact step (count=1), MMIO exit, "
                     "run() / complete()", baseline_label="bare Unicorn, mmio_map "
                     "callbacks answer inline", id="unicorn_mmio_exit",
                     note=f"{steps} exact steps in the run; kvmem's Python per exit "
                     "(thread handoff, context save/restore, the instruction translated "
                     "again with and without memory hooks, a load run twice: to its exit, "
                     "then with the answer) dominates, not Unicorn"))
    rep.add(C.Figure(f"Unicorn exact step, walker over a tracked page, {words} words (per "
                     f"access) / same walker over RAM", samples["tracked"], samples["ram"],
                     subject_label="Unicorn engine: every access an exact step (no exit)",
                     baseline_label="Unicorn engine: the same accesses block-wise on RAM",
                     id="unicorn_exact_step"))


# -- dirty-log harvest -------------------------------------------------------------------------
def bench_harvest(rep: C.Report, size: int, rounds: int) -> None:
    mem = kvmem.HostMemory.anonymous(size)
    vm = kvmem.Vm(engine="kvm")
    vm.set_memory_region(0, kvmem.KVM_MEM_LOG_DIRTY_PAGES, 0, size, mem.hva)
    kvm = kvmapi.Kvm()
    raw = kvm.create_vm()
    raw.set_user_memory_region(0, kvmapi.KVM_MEM_LOG_DIRTY_PAGES, 0, size, mem.hva)
    npages = size // PAGE
    try:
        samples = C.interleave({"kv": (lambda r: vm.get_dirty_log(0), 1),
                                "raw": (lambda r: raw.get_dirty_log(0, npages), 1)}, rounds)
    finally:
        assert vm.engine is not None
        vm.engine.close()
        raw.close()
        kvm.close()
        mem.close()
    rep.add(C.Figure(f"dirty-log harvest, {size >> 20} MiB slot, KVM engine / raw ioctl",
                     samples["kv"], samples["raw"],
                     subject_label="vm.get_dirty_log: KVM GET + fold + CLEAR, kvmem harvest",
                     baseline_label="one raw KVM_GET_DIRTY_LOG", id="kvm_harvest_vs_raw"))


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_engines", "kvmem engines: KVM transactions, Unicorn throughput, "
                   "dirty-log harvest", args.quick)
    ram = (1 << 20) if args.quick else (4 << 20)
    rounds = 3 if args.quick else 25  # walker passes here ran at ~65 or ~100 ns a word, in phases
    rep.params = {"unicorn_ram_mib": ram >> 20, "rounds": rounds}
    why_not = kvmapi.kvm_available()
    C.quiet_gc()
    try:
        bench_unicorn(rep, ram, rounds)
        bench_steps(rep, 16 if args.quick else 256, 3 if args.quick else 7)
        if why_not is None:
            bench_transactions(rep, 5 if args.quick else 40)
            bench_harvest(rep, 64 << 20, 10 if args.quick else 60)
        else:
            rep.notes.append(f"KVM figures skipped: {why_not}")
    finally:
        gc.enable()
    rep.params["kvm"] = "yes" if why_not is None else f"skipped: {why_not}"
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
