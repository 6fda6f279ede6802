"""Random gpa → hva translation: `vm.translate` and `vcpu.translate` against a dict lookup.

Layout: N one-page slots (N = 32,764 = every user slot; 4,096 with --quick) at gfn 2·i
(a one-page hole after each), all aliasing a 16-page `HostMemory.anonymous` (slot i at
page i % 16). The baseline is the fastest translation plain Python can do:

    def dict_translate(gpa): return table[gpa >> 12] + (gpa & 4095)   # table: gfn → hva

Both run through the same loop shape, `for g in batch: f(g)`, over the same pre-generated
random gpas (uniform over the slots, random offset in the page); vm.translate / vcpu.translate
are bound methods, dict_translate a plain function. Targets:
- translate over N slots ≤ 3 × dict_translate's time;
- translate over N slots ≤ 1.5 × the same translate over 10 slots (per-lookup scaling).
Informative: the same ratios for the dict itself (what cache and TLB misses cost a lookup
that touches 32k slots' worth of objects), and for gpas confined to 10 "hot" slots spread
across the N (algorithmic scaling without the misses).

    python benchmarks/bench_translate.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import random
import sys
import time
from collections.abc import Callable

import _common as C

import kvmem

PAGE = 4096
ALIAS_PAGES = 16


def build(n: int, mem: kvmem.HostMemory) -> tuple[kvmem.Vm, dict[int, int]]:
    vm = kvmem.Vm()
    for i in range(n):
        vm.set_memory_region(i, 0, 2 * i * PAGE, PAGE, mem.hva + (i % ALIAS_PAGES) * PAGE)
    # built in a loop of its own, so its key and value objects lie together in memory as
    # kvmem's translation memo's do (interleaved with 32k slot objects, the dict would
    # miss more and flatter kvmem)
    table = {2 * i: mem.hva + (i % ALIAS_PAGES) * PAGE for i in range(n)}
    return vm, table


def random_gpas(n_slots: int, count: int, seed: int, hot: int = 0) -> list[int]:
    """Uniform over all `n_slots` slots; or, with `hot`, over `hot` slots spread evenly
    across them (a small working set in a big slot set)."""
    rng = random.Random(seed)
    if hot:
        picks = [i * n_slots // hot for i in range(hot)]
        return [2 * rng.choice(picks) * PAGE + rng.randrange(PAGE) for _ in range(count)]
    return [(2 * rng.randrange(n_slots)) * PAGE + rng.randrange(PAGE) for _ in range(count)]


def make_dict_translate(table: dict[int, int]) -> Callable[[int], int]:
    def dict_translate(gpa: int) -> int:
        return table[gpa >> 12] + (gpa & 4095)
    return dict_translate


def loop(f: Callable[[int], int], slices: list[list[int]], k: int) -> Callable[[int], None]:
    """Side k translates slice (r + 5·k) % len(slices) in round r. Over the run every side
    translates every slice (the same gpas), but no side works on a slice another side has
    just pulled into the cache: with 32,764 slots a lookup is bound by cache misses, and a
    side that followed another on the same gpas would find its slots hot."""
    def run(r: int) -> None:
        for g in slices[(r + 5 * k) % len(slices)]:
            f(g)
    return run


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_translate", "kvmem gpa → hva translation vs dict lookup", args.quick)
    large = 4096 if args.quick else kvmem.uapi.KVM_USER_MEM_SLOTS
    small = 10
    batch = 2048                      # gpas per timed batch (~1 ms)
    count, rounds = (16 * batch, 12) if args.quick else (32 * batch, 128)

    mem = kvmem.HostMemory.anonymous(ALIAS_PAGES * PAGE)
    t0 = time.perf_counter()
    vm_l, table_l = build(large, mem)
    setup_s = time.perf_counter() - t0
    vm_s, table_s = build(small, mem)
    vcpu_l, vcpu_s = vm_l.create_vcpu(0), vm_s.create_vcpu(0)
    gpas_l = random_gpas(large, count, 1)
    gpas_s = random_gpas(small, count, 2)
    gpas_h = random_gpas(large, count, 3, hot=small)
    dict_l, dict_s = make_dict_translate(table_l), make_dict_translate(table_s)
    # warm kvmem's translation memo in gfn order, the order the dict was built in: filled
    # in the order of the timed gpas, its entries would be walked sequentially every round
    # (a prefetcher's gift the dict does not get)
    for v, n in ((vm_l, large), (vm_s, small)):
        for i in range(n):
            v.translate(2 * i * PAGE)
    for g in gpas_l[:2000]:  # same answers on both sides
        assert vm_l.translate(g) == vcpu_l.translate(g) == dict_l(g)
    for g in gpas_s[:2000]:
        assert vm_s.translate(g) == vcpu_s.translate(g) == dict_s(g)
    sl_l = [gpas_l[i:i + batch] for i in range(0, count, batch)]
    sl_s = [gpas_s[i:i + batch] for i in range(0, count, batch)]
    sl_h = [gpas_h[i:i + batch] for i in range(0, count, batch)]
    rep.params = {"large_slots": large, "small_slots": small, "random_gpas": count,
                  "gpas_per_batch": batch, "rounds": rounds,
                  "setup_large_s": round(setup_s, 2)}

    C.quiet_gc()
    try:
        s = C.interleave({
            "vm_l": (loop(vm_l.translate, sl_l, 0), batch),
            "vcpu_l": (loop(vcpu_l.translate, sl_l, 1), batch),
            "dict_l": (loop(dict_l, sl_l, 2), batch),
            "vm_s": (loop(vm_s.translate, sl_s, 0), batch),
            "vcpu_s": (loop(vcpu_s.translate, sl_s, 1), batch),
            "dict_s": (loop(dict_s, sl_s, 2), batch),
            "vm_h": (loop(vm_l.translate, sl_h, 3), batch),
            "vcpu_h": (loop(vcpu_l.translate, sl_h, 4), batch),
            "dict_h": (loop(dict_l, sl_h, 5), batch),
        }, rounds)
    finally:
        gc.enable()

    L, S = f"{large} slots", f"{small} slots"
    rep.add(C.Figure(f"vm.translate, {L} / dict", s["vm_l"], s["dict_l"], target=3.0,
                     baseline_label="dict_translate", id="vm_large_vs_dict"))
    rep.add(C.Figure(f"vcpu.translate, {L} / dict", s["vcpu_l"], s["dict_l"], target=3.0,
                     baseline_label="dict_translate", id="vcpu_large_vs_dict"))
    rep.add(C.Figure(f"vm.translate, {L} / {S}", s["vm_l"], s["vm_s"], target=1.5,
                     baseline_label=f"vm.translate at {small} slots",
                     id="vm_large_vs_small"))
    rep.add(C.Figure(f"vcpu.translate, {L} / {S}", s["vcpu_l"], s["vcpu_s"], target=1.5,
                     baseline_label=f"vcpu.translate at {small} slots",
                     id="vcpu_large_vs_small"))
    rep.add(C.Figure(f"vm.translate, {S} / dict", s["vm_s"], s["dict_s"],
                     baseline_label="dict_translate", id="vm_small_vs_dict"))
    rep.add(C.Figure(f"vcpu.translate, {S} / dict", s["vcpu_s"], s["dict_s"],
                     baseline_label="dict_translate", id="vcpu_small_vs_dict"))
    rep.add(C.Figure(f"dict_translate, {L} / {S}", s["dict_l"], s["dict_s"],
                     subject_label="dict_translate", baseline_label="dict_translate",
                     id="dict_large_vs_small",
                     note="informative: what the memory hierarchy alone costs at scale"))
    H = f"{large} slots, {small} hot"
    rep.add(C.Figure(f"vm.translate, {H} / {S}", s["vm_h"], s["vm_s"],
                     baseline_label=f"vm.translate at {small} slots", id="vm_hot_vs_small",
                     note=f"informative: gpas over {small} slots spread across all {large} "
                          "(algorithmic scaling without the cache misses)"))
    rep.add(C.Figure(f"vcpu.translate, {H} / {S}", s["vcpu_h"], s["vcpu_s"],
                     baseline_label=f"vcpu.translate at {small} slots", id="vcpu_hot_vs_small"))
    rep.add(C.Figure(f"dict_translate, {H} / {S}", s["dict_h"], s["dict_s"],
                     subject_label="dict_translate", baseline_label="dict_translate",
                     id="dict_hot_vs_small"))
    rep.notes.append("times are per lookup, including the shared `for g in batch: f(g)` loop")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
