"""Snapshot reset and save speed (issue 11, point 5), every figure against a baseline of the
same run.

The guest is the bundled `walker`, dirtying 16 pages per run (one word each); between two
resets it runs to its halt (untimed); each sample is one `vm.restore(snap)` (memory, layout
check, vCPU state, dirty logs), rounds interleaved so noise hits subject and baseline alike.

Figures:
- size (KVM; Unicorn): a reset of a 1 GiB VM vs a reset of a 16 MiB VM — target ≤ 1.2
  (the cost follows the dirty pages, not the memory size);
- floor (KVM): a reset vs the floor — harvesting the 16 entries from KVM's dirty ring by
  hand, KVM_RESET_DIRTY_RINGS, and a memcpy of the 16 pages back — target ≤ 3; beside it
  (info) the floor plus the vCPU state loaded as a reset loads it, packed in advance
  (KVM_SET_SREGS, _XSAVE, _MSRS, _MP_STATE; regs and events staged in kvm_run for
  the next KVM_RUN where KVM_CAP_SYNC_REGS allows, else two more ioctls). Each of the two
  is its own interleave of the reset and its baseline;
- full copy (KVM; Unicorn): resets per second vs a full-copy reset (all of guest memory
  copied back, and the vCPU state) at 256 MiB — target ≥ 30;
- Unicorn's own (info): a reset on the Unicorn engine vs Unicorn 2's context_restore of a
  `context_save` taken with UC_CTL_CONTEXT_MEMORY (CPU + copy-on-write memory snapshot),
  on a raw `Uc` running the same walker over 16 MiB;
- save: `snap.save(path)` of a 256 MiB VM whose every page holds data vs writing the same
  bytes to the same file raw (one write per 8 MiB) — throughput, target ≥ 0.5.

    python benchmarks/bench_snapshot.py [--json FILE] [--quick] [--strict]

`--quick` shrinks 1 GiB to 64 MiB and 256 MiB to 32 MiB, with few rounds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import _common as C

import kvmem
from kvmem.engines import ExitKind, Regs, kvm_usable
from kvmem.guests import program

MiB = 1 << 20
PAGE = 4096
CODE, DATA, DIRTY = 0x1000, 0x100000, 16


class Guest:
    """A VM on `engine` with `size` bytes of RAM, the walker ready to dirty 16 pages, and a
    snapshot of it about to run."""

    def __init__(self, engine: str, size: int, flags: int = 0, snapshot: bool = True) -> None:
        self.mem = kvmem.HostMemory.anonymous(size)
        self.vm = kvmem.Vm(engine=engine, address_spaces=1)
        assert self.vm.engine is not None
        self.vm.set_memory_region(0, flags, 0, size, self.mem.hva)
        self.vm.write(CODE, program("walker"))
        self.cpu = self.vm.create_vcpu(0)
        self.cpu.start(CODE, Regs(esi=DATA, ecx=DIRTY * PAGE, edi=PAGE, ebx=7, ebp=1))
        self.state = self.cpu.get_state()
        self.snap = self.vm.snapshot() if snapshot else None

    def run(self) -> None:
        e = self.cpu.run()
        assert e.kind is ExitKind.IO, e
        assert self.cpu.run().kind is ExitKind.HLT

    def reset(self) -> None:
        assert self.snap is not None
        self.vm.restore(self.snap)

    def close(self) -> None:
        if self.vm.engine is not None:
            self.vm.engine.close()
        self.mem.close()


def timed(pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]], rounds: int
          ) -> dict[str, list[float]]:
    """Per key, `prepare()` untimed then `op()` timed, one sample per round, the order of
    the keys rotating round by round."""
    keys = list(pairs)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds + 2):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            prepare, op = pairs[k]
            prepare()
            t0 = C.now_ns()
            op()
            t1 = C.now_ns()
            if r >= 2:
                out[k].append(float(t1 - t0))
    return out


def floor_ops(g: Guest) -> tuple[Callable[[], None], Callable[[], None]]:
    """The least a reset of the KVM engine's guest can do: the ring's entries read by hand,
    KVM_RESET_DIRTY_RINGS, the pages copied back (the engine's own ring and fd, reached
    past its interface: this is the floor, not a user of kvmem); and the same plus the
    vCPU state's load, packed in advance."""
    from kvmem.cpu import kvm_state

    eng: Any = g.vm.engine
    backend: Any = g.cpu.backend
    ring, fd, vfd = backend._ring, eng._fd, backend._fd
    mv = g.mem.view()
    saved = bytes(mv)
    prepared = kvm_state.prepare(vfd, g.state)

    def memory() -> None:
        entries = ring.harvest()
        fd.reset_dirty_rings()
        for _slot, offset in entries:
            at = offset * PAGE
            mv[at:at + PAGE] = saved[at:at + PAGE]

    def with_state() -> None:
        memory()
        kvm_state.load(vfd, prepared, checked=True)

    return memory, with_state


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_snapshot", "kvmem snapshot reset and save", args.quick)
    big, small, copy_size = (64 * MiB, 16 * MiB, 32 * MiB) if args.quick else \
        (1024 * MiB, 16 * MiB, 256 * MiB)
    rounds = 15 if args.quick else 201
    engines = ["unicorn"] + (["kvm"] if kvm_usable() is None else [])
    rep.params = {"rounds": rounds, "dirty pages/reset": DIRTY, "engines": ",".join(engines),
                  "big": f"{big >> 20} MiB", "small": f"{small >> 20} MiB",
                  "full copy at": f"{copy_size >> 20} MiB"}
    C.quiet_gc()
    for engine in engines:
        for fig in engine_figures(engine, big, small, copy_size, rounds):
            rep.add(fig)
    rep.add(unicorn_own(rounds))
    rep.add(save_speed(copy_size, max(3, rounds // 20)))
    return rep.finish(args)


def engine_figures(engine: str, big: int, small: int, copy_size: int, rounds: int
                   ) -> list[C.Figure]:
    figs = []
    g_big, g_small = Guest(engine, big), Guest(engine, small)
    try:
        s = timed({"big": (g_big.run, g_big.reset), "small": (g_small.run, g_small.reset)},
                  rounds)
        figs.append(C.Figure(f"{engine}: reset {big >> 20} MiB vs {small >> 20} MiB",
                             s["big"], s["small"], "time", 1.2,
                             f"restore, {big >> 20} MiB", f"restore, {small >> 20} MiB",
                             id=f"{engine}_size"))
        g_big.close()
        if engine == "kvm":
            figs += floor_figures(g_small, small, rounds)
    finally:
        g_big.close()
        g_small.close()
    figs.append(full_copy_figure(engine, copy_size, max(5, rounds // 10)))
    return figs


def floor_figures(g: Guest, size: int, rounds: int) -> list[C.Figure]:
    floor = Guest("kvm", size, kvmem.KVM_MEM_LOG_DIRTY_PAGES, snapshot=False)
    try:
        memory, with_state = floor_ops(floor)

        def restart() -> None:  # the floor of memory alone: the state, untimed
            floor.cpu.set_state(floor.state)
            floor.run()

        # one interleave per figure, each of the reset and its baseline alone (a third op
        # in the same rounds leaves the caches the reset finds colder, and slows it)
        s = timed({"reset": (g.run, g.reset), "floor": (restart, memory)}, rounds)
        t = timed({"reset": (g.run, g.reset), "floor+state": (restart, with_state)}, rounds)
        return [C.Figure("kvm: reset vs floor (ring harvest + reset ioctl + memcpy)",
                         s["reset"], s["floor"], "time", 3.0, "vm.restore",
                         "ring entries + KVM_RESET_DIRTY_RINGS + 16 page copies",
                         id="kvm_floor"),
                C.Figure("kvm: reset vs floor + vCPU state ioctls",
                         t["reset"], t["floor+state"], "time", None, "vm.restore",
                         "the floor + the state's KVM_SET_* ioctls, packed",
                         id="kvm_floor_state")]
    finally:
        floor.close()


def full_copy_figure(engine: str, size: int, rounds: int) -> C.Figure:
    g, naive = Guest(engine, size), Guest(engine, size, snapshot=False)
    try:
        mv = naive.mem.view()
        saved = bytes(mv)

        def full_copy() -> None:
            mv[:] = saved
            naive.cpu.set_state(naive.state)

        s = timed({"reset": (g.run, g.reset), "copy": (naive.run, full_copy)}, rounds)
        return C.Figure(f"{engine}: resets/s vs a full-copy reset at {size >> 20} MiB",
                        s["reset"], s["copy"], "throughput", 30.0, "vm.restore",
                        "copy all memory back + set_state", id=f"{engine}_full_copy")
    finally:
        g.close()
        naive.close()


def unicorn_own(rounds: int) -> C.Figure:
    from unicorn import Uc
    from unicorn import x86_const as X
    from unicorn.unicorn_const import (
        UC_ARCH_X86,
        UC_CTL_CONTEXT_CPU,
        UC_CTL_CONTEXT_MEMORY,
        UC_CTL_CONTEXT_MODE,
        UC_CTL_IO_WRITE,
        UC_HOOK_INSN,
        UC_MODE_32,
    )

    g = Guest("unicorn", 16 * MiB)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 16 * MiB)
    uc.mem_write(CODE, program("walker"))
    for reg, value in ((X.UC_X86_REG_ESI, DATA), (X.UC_X86_REG_ECX, DIRTY * PAGE),
                       (X.UC_X86_REG_EDI, PAGE), (X.UC_X86_REG_EBX, 7),
                       (X.UC_X86_REG_EBP, 1), (X.UC_X86_REG_EIP, CODE)):
        uc.reg_write(reg, value)
    uc.hook_add(UC_HOOK_INSN, lambda *a: None, None, 1, 0, X.UC_X86_INS_OUT)
    uc.ctl(UC_CTL_CONTEXT_MODE, UC_CTL_IO_WRITE, UC_CTL_CONTEXT_CPU | UC_CTL_CONTEXT_MEMORY)
    ctx = uc.context_save()

    def uc_run() -> None:
        uc.emu_start(CODE, 0, count=10_000)  # to the hlt

    def uc_reset() -> None:
        uc.context_restore(ctx)

    try:
        s = timed({"kvmem": (g.run, g.reset), "uc": (uc_run, uc_reset)}, rounds)
    finally:
        g.close()
    return C.Figure("unicorn: reset vs Unicorn's context_restore (CPU + memory snapshot)",
                    s["kvmem"], s["uc"], "time", None, "vm.restore (Unicorn engine)",
                    "uc.context_restore, UC_CTL_CONTEXT_MEMORY", id="unicorn_own")


def save_speed(size: int, rounds: int) -> C.Figure:
    mem = kvmem.HostMemory.anonymous(size)
    vm = kvmem.Vm()
    try:
        vm.set_memory_region(0, 0, 0, size, mem.hva)
        mv = mem.view()
        block = os.urandom(MiB)
        for at in range(0, size, MiB):
            mv[at:at + MiB] = block
        snap = vm.snapshot()
        image = snap.images[0][1]
        with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
            path = os.path.join(tmp, "snap")

            def save() -> None:
                snap.save(path)

            def raw() -> None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for at in range(0, size, 8 * MiB):
                        os.write(fd, image[at:at + 8 * MiB])
                finally:
                    os.close(fd)

            s = timed({"save": (lambda: None, save), "raw": (lambda: None, raw)}, rounds)
        return C.Figure(f"save {size >> 20} MiB: snap.save vs a raw write of the bytes",
                        s["save"], s["raw"], "throughput", 0.5, "snap.save",
                        "os.write of the same bytes, same file", id="save")
    finally:
        mem.close()


if __name__ == "__main__":
    raise SystemExit(main())
