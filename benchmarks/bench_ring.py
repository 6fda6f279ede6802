"""Dirty-ring harvest cost follows the dirty pages, not the memory size.

A guest dirties 16 pages (spread over its whole memory) between two harvests; what is timed
is the harvest and the reset that re-arms logging: `vcpu.dirty_ring.harvest()` +
`vm.reset_dirty_rings()`. The same is done on a 1 GiB VM (subject) and a 16 MiB VM
(baseline), interleaved sample by sample; the writes are made untimed before each sample.

Figures (all measured in this run):
- ring, kvmem alone: the 16 pages are written by `vcpu.guest_write` (write faults through
  kvmem's MMU, one ring entry each); 1 GiB vs 16 MiB, target ≤ 1.2;
- ring, KVM engine (where /dev/kvm works): a real guest (the bundled walker, 16 stores at a
  stride of memory/16) run to its halt; the entries are KVM's, read from the ring mmap'd
  from the vCPU fd, and the reset is kvmem's walk + KVM_RESET_DIRTY_RINGS; 1 GiB vs 16 MiB,
  target ≤ 1.2; and the same harvest + reset against the floor — the raw ring read
  (`kvmem.dirty.RingReader`) and the raw KVM_RESET_DIRTY_RINGS ioctl on a kernel VM of 1 GiB
  with the same guest — informative;
- bitmap, for contrast: `vm.get_dirty_log(slot)` after the same 16 guest writes, 1 GiB vs
  16 MiB — grows with the memory (informative).

    python benchmarks/bench_ring.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

import _common as C

import kvmem
import kvmem.engines
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem.dirty import RingReader
from kvmem.engines import ExitKind, Regs
from kvmem.guests import PORT_RESULT, program
from kvmem.kvmapi import KVM_EXIT_HLT, KVM_EXIT_IO, Kvm, KvmRegs, KvmSegment, kvm_available

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
DIRTY = 16
RING = 64 * 1024  # 4,096 entries
DATA = 1 << 30  # gpa of the data slot; code lives at 0
CODE = 0x1000


def timed_pairs(rounds: int, dirty: dict[str, Callable[[], None]],
                timed: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Per round and per key (order rotating): `dirty[key]()` untimed, then `timed[key]()`
    timed alone; ns per call."""
    keys = list(timed)
    out: dict[str, list[float]] = {k: [] for k in keys}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds + 1):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in order:
                dirty[k]()
                t0 = C.now_ns()
                timed[k]()
                t1 = C.now_ns()
                if r:
                    out[k].append(float(t1 - t0))
    finally:
        gc.enable()
    return out


def model_vm(size: int, ring: bool) -> tuple[kvmem.Vm, kvmem.Vcpu, kvmem.HostMemory]:
    mem = kvmem.HostMemory.anonymous(size)
    vm = kvmem.Vm()
    if ring:
        vm.enable_dirty_ring(RING)
    vm.set_memory_region(1, LOG, DATA, size, mem.hva)
    return vm, vm.create_vcpu(0), mem


def model_figures(rep: C.Report, rounds: int) -> None:
    made = {}
    for name, size in (("1g", GiB), ("16m", 16 * MiB)):
        for ring in (True, False):
            made[(name, ring)] = model_vm(size, ring)
    stride = {"1g": GiB // DIRTY, "16m": 16 * MiB // DIRTY}

    def writer(vcpu: kvmem.Vcpu, step: int) -> Callable[[], None]:
        def write() -> None:
            for i in range(DIRTY):
                vcpu.guest_write(DATA + i * step, b"dirty")
        return write

    def ring_reset(vm: kvmem.Vm, vcpu: kvmem.Vcpu) -> Callable[[], object]:
        def harvest() -> int:
            got = vcpu.dirty_ring.harvest()
            assert len(got) == DIRTY, got
            return vm.reset_dirty_rings()
        return harvest

    def bitmap_get(vm: kvmem.Vm) -> Callable[[], object]:
        return lambda: vm.get_dirty_log(1)

    dirty = {f"{n}{'r' if r else 'b'}": writer(v[1], stride[n]) for (n, r), v in made.items()}
    timed: dict[str, Callable[[], object]] = {}
    for (n, r), (vm, vcpu, _) in made.items():
        timed[f"{n}{'r' if r else 'b'}"] = ring_reset(vm, vcpu) if r else bitmap_get(vm)
    s = timed_pairs(rounds, dirty, timed)
    rep.add(C.Figure(f"ring harvest + reset, {DIRTY} dirty pages: 1 GiB vs 16 MiB (kvmem)",
                     s["1gr"], s["16mr"], target=1.2, subject_label="1 GiB VM",
                     baseline_label="16 MiB VM", id="ring_model_1g_vs_16m"))
    rep.add(C.Figure(f"bitmap get_dirty_log, {DIRTY} dirty pages: 1 GiB vs 16 MiB (kvmem)",
                     s["1gb"], s["16mb"], subject_label="1 GiB VM", baseline_label="16 MiB VM",
                     id="bitmap_model_1g_vs_16m", note="for contrast: scans the whole bitmap"))
    for _, _, mem in made.values():
        mem.close()


def kvm_figures(rep: C.Report, rounds: int) -> None:
    engines: dict[str, tuple[kvmem.Vm, kvmem.Vcpu, kvmem.HostMemory]] = {}
    for name, size in (("1g", GiB), ("16m", 16 * MiB)):
        mem = kvmem.HostMemory.anonymous(size)
        vm = kvmem.Vm(engine="kvm")
        vm.enable_dirty_ring(RING)
        code = kvmem.HostMemory.anonymous(16 * PAGE)
        vm.set_memory_region(0, 0, 0, 16 * PAGE, code.hva)
        vm.set_memory_region(1, LOG, DATA, size, mem.hva)
        vm.write(CODE, program("walker"))
        assert vm.engine is not None
        engines[name] = (vm, vm.create_vcpu(0), mem)

    def walker(cpu: kvmem.Vcpu, size: int) -> Callable[[], None]:
        def run() -> None:
            cpu.start(CODE, Regs(esi=DATA, ecx=size, edi=size // DIRTY, ebx=1, ebp=1))
            e = cpu.run()
            assert (e.kind, e.addr) == (ExitKind.IO, PORT_RESULT), e
            assert cpu.run().kind is ExitKind.HLT
        return run

    def harvest_reset(vm: kvmem.Vm, cpu: kvmem.Vcpu) -> Callable[[], object]:
        def go() -> int:
            got = cpu.dirty_ring.harvest()
            assert len(got) == DIRTY, got
            return vm.reset_dirty_rings()
        return go

    # the floor: a kernel VM of 1 GiB, its ring read raw, the reset ioctl raw
    kvm = Kvm()
    kvm_vm = kvm.create_vm()
    kvm_vm.enable_dirty_ring(RING)
    raw_mem = kvmem.HostMemory.anonymous(GiB)
    raw_code = kvmem.HostMemory.anonymous(16 * PAGE)
    raw_code.view()[CODE:CODE + len(program("walker"))] = program("walker")
    kvm_vm.set_user_memory_region(0, 0, 0, 16 * PAGE, raw_code.hva)
    kvm_vm.set_user_memory_region(1, LOG, DATA, GiB, raw_mem.hva)
    kvcpu = kvm_vm.create_vcpu(0)
    reader = RingReader(kvcpu.map_dirty_ring(RING))
    engine_cpu = engines["1g"][1]
    assert isinstance(engine_cpu.backend, kvmem.engines.kvm.KvmEngineVcpu)
    sregs = kvcpu.get_sregs()
    flat = KvmSegment(base=0, limit=0xFFFF_FFFF, selector=0x10, type=3, present=1, dpl=0,
                      db=1, s=1, l=0, g=1)
    sregs.cs = KvmSegment(base=0, limit=0xFFFF_FFFF, selector=0x08, type=11, present=1, dpl=0,
                          db=1, s=1, l=0, g=1)
    for seg in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, seg, flat)
    sregs.cr0, sregs.cr4, sregs.efer = 0x11, 0, 0
    kvcpu.set_sregs(sregs)

    def raw_walker() -> None:
        kvcpu.set_regs(KvmRegs(rsi=DATA, rcx=GiB, rdi=GiB // DIRTY, rbx=1, rbp=1, rip=CODE,
                               rflags=2))
        assert kvcpu.run() == KVM_EXIT_IO
        assert kvcpu.run() == KVM_EXIT_HLT

    def raw_harvest_reset() -> int:
        got = reader.harvest()
        assert len(got) == DIRTY, got
        return kvm_vm.reset_dirty_rings()

    dirty = {n: walker(cpu, GiB if n == "1g" else 16 * MiB) for n, (_, cpu, _) in
             engines.items()}
    timed = {n: harvest_reset(vm, cpu) for n, (vm, cpu, _) in engines.items()}
    dirty["raw"], timed["raw"] = raw_walker, raw_harvest_reset
    s = timed_pairs(rounds, dirty, timed)
    rep.add(C.Figure(f"ring harvest + reset, {DIRTY} dirty pages: 1 GiB vs 16 MiB (KVM)",
                     s["1g"], s["16m"], target=1.2, subject_label="1 GiB VM",
                     baseline_label="16 MiB VM", id="ring_kvm_1g_vs_16m"))
    rep.add(C.Figure(f"ring harvest + reset, {DIRTY} dirty pages, 1 GiB: kvmem vs raw (KVM)",
                     s["1g"], s["raw"], subject_label="kvmem (KVM engine)",
                     baseline_label="RingReader + KVM_RESET_DIRTY_RINGS", id="ring_kvm_vs_raw"))
    kvcpu.close()
    kvm_vm.close()
    kvm.close()
    for vm, _, mem in engines.values():
        assert vm.engine is not None
        vm.engine.close()
        mem.close()
    raw_mem.close()
    raw_code.close()


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_ring", "dirty-ring harvest + reset: 1 GiB vs 16 MiB VM", args.quick)
    rounds = 9 if args.quick else 101
    rep.params = {"rounds": rounds, "dirty pages": DIRTY, "ring": f"{RING // 16} entries"}
    model_figures(rep, rounds)
    reason = kvm_available()
    if reason is None:
        kvm_figures(rep, rounds)
    else:
        rep.notes.append(f"KVM figures skipped: {reason}")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
