"""Slot update cost: `vm.set_memory_region` create / move / delete with many slots present.

Layout: slot i (id i) at gfn 4·i, 2 pages, a 2-page hole after each; all alias a 64-page
`HostMemory.anonymous`. Two VMs are built: LARGE with 32,763 slots present (ids 0..32,762,
i.e. all user slots but one; 4,096 with --quick) and SMALL with 100. One cycle, on each:
    create id X = 32,763 in a hole in the middle of the gfn range,
    move X to a hole a quarter of the way up, delete X,
    transaction: split slot n/3 into two (second piece: lowest free id), transaction: merge back.
Cycles of both VMs are interleaved round by round; every operation is timed on its own.
Target: each of create / move / delete at LARGE ≤ 2 × its cost at SMALL.

Where /dev/kvm works (`kvmem.kvmapi.kvm_available()` is None), two real KVM VMs with the
same slots get the same create / move / delete through `KvmVm.set_user_memory_region`,
interleaved with the kvmem runs; kvmem/KVM ratios are informative (no target).

    python benchmarks/bench_slots.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import _common as C

import kvmem
from kvmem import kvmapi

PAGE = 4096
SLOT_PAGES = 2
ALIAS = 32  # slots share 32 two-page windows of one mapping

OPS = ("create", "move", "delete")


def gpa_of(i: int) -> int:
    return 4 * i * PAGE


def hole(i: int) -> int:
    """The gpa of the 2-page hole after slot i."""
    return (4 * i + 2) * PAGE


def hva_of(mem: kvmem.HostMemory, i: int) -> int:
    return mem.hva + (i % ALIAS) * SLOT_PAGES * PAGE


SetRegion = Callable[[int, int, int, int, int], None]


def populate(set_region: SetRegion, mem: kvmem.HostMemory, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        set_region(i, 0, gpa_of(i), SLOT_PAGES * PAGE, hva_of(mem, i))
    return time.perf_counter() - t0


class Subject:
    """One VM (kvmem or KVM) with `n` slots and its per-operation samples."""

    def __init__(self, label: str, set_region: SetRegion, n: int, x: int,
                 mem: kvmem.HostMemory, vm: kvmem.Vm | None = None) -> None:
        self.label = label
        self.set_region = set_region
        self.n = n
        self.x = x
        self.mem = mem
        self.vm = vm
        self.samples: dict[str, list[float]] = {k: [] for k in
                                                (*OPS, "cycle", "split", "merge")}

    def cycle(self, count: int) -> None:
        now = C.now_ns
        set_region, x, size = self.set_region, self.x, SLOT_PAGES * PAGE
        at, to, hva = hole(self.n // 2), hole(self.n // 4), self.mem.hva
        cr, mv, de, cy = (self.samples[k] for k in (*OPS, "cycle"))
        for _ in range(count):
            t0 = now()
            set_region(x, 0, at, size, hva)
            t1 = now()
            set_region(x, 0, to, size, hva)
            t2 = now()
            set_region(x, 0, 0, 0, 0)
            t3 = now()
            cr.append(t1 - t0)
            mv.append(t2 - t1)
            de.append(t3 - t2)
            cy.append(t3 - t0)
        if self.vm is not None:
            self.transactions(count)

    def transactions(self, count: int) -> None:
        vm, now = self.vm, C.now_ns
        assert vm is not None
        k = self.n // 3
        cut = gpa_of(k) + PAGE
        sp, me = self.samples["split"], self.samples["merge"]
        for _ in range(count):
            t0 = now()
            with vm.transaction() as tx:
                pieces = tx.split(k, [cut])
            t1 = now()
            with vm.transaction() as tx:
                tx.merge(pieces)
            t2 = now()
            sp.append(t1 - t0)
            me.append(t2 - t1)


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_slots", "kvmem slot updates: many slots vs few (and vs real KVM)",
                   args.quick)
    max_slots = kvmem.uapi.KVM_USER_MEM_SLOTS
    large = 4096 if args.quick else max_slots - 1
    small = 100
    rounds, cycles = (4, 3) if args.quick else (25, 8)

    mem = kvmem.HostMemory.anonymous(ALIAS * SLOT_PAGES * PAGE)
    subjects: dict[str, Subject] = {}
    params: dict[str, object] = {"large_slots": large, "small_slots": small,
                                 "rounds": rounds, "cycles_per_round": cycles}
    for tag, n in (("kv_s", small), ("kv_l", large)):
        vm = kvmem.Vm()
        params[f"setup_{tag}_s"] = round(populate(vm.set_memory_region, mem, n), 2)
        subjects[tag] = Subject(f"kvmem {n}", vm.set_memory_region, n, max_slots - 1, mem, vm)

    why_not = kvmapi.kvm_available()
    kvm_objs: list[kvmapi.Kvm | kvmapi.KvmVm] = []
    if why_not is None:
        try:
            kvm = kvmapi.Kvm()
            kvm_objs.append(kvm)
            nr = kvm.caps().nr_memslots
            if large >= nr:
                raise OSError(f"this KVM has only {nr} memslots")
            for tag, n in (("kvm_s", small), ("kvm_l", large)):
                kvm_vm = kvm.create_vm()
                kvm_objs.append(kvm_vm)
                params[f"setup_{tag}_s"] = round(
                    populate(kvm_vm.set_user_memory_region, mem, n), 2)
                subjects[tag] = Subject(f"KVM {n}", kvm_vm.set_user_memory_region, n, nr - 1,
                                        mem)
            params["kvm_memslots"] = nr
        except OSError as e:
            why_not = f"KVM setup failed: {e}"
            for tag in ("kvm_s", "kvm_l"):
                subjects.pop(tag, None)
    params["kvm"] = "yes" if why_not is None else f"skipped: {why_not}"
    rep.params = params

    C.quiet_gc()
    try:
        keys = list(subjects)
        for r in range(1 + rounds):  # round 0 is warm-up
            shift = r % len(keys)
            order = keys[shift:] + keys[:shift]
            for k in (reversed(order) if r % 2 else order):
                subjects[k].cycle(cycles)
            if r == 0:
                for sub in subjects.values():
                    for v in sub.samples.values():
                        v.clear()
    finally:
        gc.enable()
        for o in reversed(kvm_objs):
            o.close()

    kl, ks = subjects["kv_l"].samples, subjects["kv_s"].samples
    L, S = f"{large} slots", f"{small} slots"
    for op in OPS:
        rep.add(C.Figure(f"{op}, {L} / {S}", kl[op], ks[op], target=2.0,
                         baseline_label=f"kvmem {op} at {small} slots", id=f"{op}_large_vs_small"))
    rep.add(C.Figure(f"create+move+delete, {L} / {S}", kl["cycle"], ks["cycle"],
                     baseline_label=f"kvmem cycle at {small} slots", id="cycle_large_vs_small"))
    rep.add(C.Figure(f"tx split (default id), {L} / {S}", kl["split"], ks["split"],
                     baseline_label=f"kvmem split at {small} slots", id="split_large_vs_small"))
    rep.add(C.Figure(f"tx merge, {L} / {S}", kl["merge"], ks["merge"],
                     baseline_label=f"kvmem merge at {small} slots", id="merge_large_vs_small"))
    if "kvm_l" in subjects:
        ml, ms = subjects["kvm_l"].samples, subjects["kvm_s"].samples
        for op in OPS:
            rep.add(C.Figure(f"{op} kvmem/KVM, {L}", kl[op], ml[op],
                             baseline_label=f"KVM ioctl {op} at {large} slots",
                             id=f"{op}_large_vs_kvm"))
            rep.add(C.Figure(f"{op} kvmem/KVM, {S}", ks[op], ms[op],
                             baseline_label=f"KVM ioctl {op} at {small} slots",
                             id=f"{op}_small_vs_kvm"))
        for op in OPS:
            rep.add(C.Figure(f"{op} KVM, {L} / {S}", ml[op], ms[op], subject_label="KVM",
                             baseline_label=f"KVM {op} at {small} slots",
                             id=f"{op}_kvm_large_vs_small"))
    else:
        rep.notes.append(f"real KVM comparison skipped: {why_not}")
    rep.notes.append("times are per operation (one set_memory_region call / one transaction); "
                     "KVM times include the thin Python ioctl wrapper (struct pack + "
                     "fcntl.ioctl)")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
