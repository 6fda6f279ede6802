"""guest_memfd: a punch-hole invalidation (by gfn, no hva) against an hva invalidation.

Figures (measured in this run, alternating round by round):
- punch: `gmem.punch_hole(0, size)` of a 64 MiB guest_memfd that backs a gmem-only slot
  with every tenth page written (so allocated) and mapped in the stage-2: the MMU's begin /
  range_add + zap + flush / end, the pages' identities replaced, the file's pages freed;
- baseline: `mem.discard(...)` of a 64 MiB hva slot's memory in the same VM with the same
  pages written and mapped: the MMU notifier's begin / range_add + zap + flush / end, and
  the pages freed (MADV_DONTNEED) — the hva invalidation that frees the same memory.
  The pages are written and faulted in again before each round (untimed).
- informative: the punch against `vm.invalidate_hva_range` (an invalidation that frees
  nothing), and both with one page mapped over 4 KiB (a bracket's fixed cost).

Target: the punch costs ≤ 1.5 × the hva invalidation of the same range with the same number
of mapped pages (issue 12, point 8).

    python benchmarks/bench_gmem.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import sys

import _common as C

import kvmem

MiB = 1 << 20
PAGE = 4096
GPA_GMEM = 1 << 32  # the two slots live side by side in one VM


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_gmem", "guest_memfd punch-hole invalidation vs hva invalidation",
                   args.quick)
    rounds = 5 if args.quick else 21
    size = 16 * MiB if args.quick else 64 * MiB
    rep.params = {"rounds": rounds, "range": f"{size // MiB} MiB", "mapped": "every 10th page"}
    punch, freed, bare, mapped = invalidations(size, 10, rounds)
    rep.add(C.Figure(f"punch_hole {size // MiB} MiB, {mapped} pages mapped", punch, freed,
                     target=1.5, baseline_label="mem.discard, same pages mapped",
                     id="punch_vs_hva", note="per call; both free the pages"))
    rep.add(C.Figure(f"punch_hole {size // MiB} MiB vs invalidate_hva_range", punch, bare,
                     baseline_label="invalidate_hva_range, same pages mapped",
                     id="punch_vs_hva_notifier",
                     note="per call; the baseline frees nothing"))
    punch1, freed1, _, _ = invalidations(PAGE, 1, rounds * 4)
    rep.add(C.Figure("punch_hole 4 KiB, 1 page mapped", punch1, freed1,
                     baseline_label="mem.discard, same page mapped",
                     id="punch_vs_hva_one_page", note="per call: a bracket's fixed cost"))
    rep.notes.append("time ratio = kvmem punch time / hva invalidation time (lower is "
                     "better)")
    return rep.finish(args)


def invalidations(size: int, every: int, rounds: int
                  ) -> tuple[list[float], list[float], list[float], int]:
    """(punch ns, discard ns, invalidate_hva_range ns, pages mapped) per round."""
    mem = kvmem.HostMemory.anonymous(size + PAGE)  # hva slot one page in: 4 KiB mappings
    vm = kvmem.Vm()
    gmem = vm.create_guest_memfd(size, kvmem.GUEST_MEMFD_FLAG_MMAP
                                 | kvmem.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_memory_region(0, 0, 0, size, mem.hva + PAGE)
    vm.set_memory_region2(1, kvmem.KVM_MEM_GUEST_MEMFD, GPA_GMEM, size, mem.hva + PAGE,
                          guest_memfd=gmem, guest_memfd_offset=0)
    vcpu = vm.create_vcpu(0)
    pages = range(0, size // PAGE, every)
    out: dict[str, list[float]] = {"punch": [], "discard": [], "bare": []}
    mapped = 0

    def run(which: str) -> None:
        if which == "punch":
            gmem.punch_hole(0, size)
        elif which == "discard":
            mem.discard(PAGE, size)
        else:
            vm.invalidate_hva_range(mem.hva + PAGE, mem.hva + PAGE + size)

    for r in range(rounds):
        # alternate the order, so neither always runs on a warmer cache
        for which in ("punch", "discard", "bare")[::1 if r % 2 else -1]:
            for p in pages:  # written: a page exists to free; mapped in both slots
                vcpu.guest_write(p * PAGE, b"x")
                vcpu.guest_write(GPA_GMEM + p * PAGE, b"x")
            mapped = vm.mmu.mapped(0) // 2
            assert mapped == len(pages)
            gc.collect()
            t0 = C.now_ns()
            run(which)
            out[which].append(C.now_ns() - t0)
            vm.mmu.zap_gfn_range(0, 0, (GPA_GMEM + size) >> 12)  # the other slot's too
        assert vm.mmu.mapped(0) == 0 and vm.mmu.stale_sptes() == []
    vm.set_memory_region(1, 0, 0, 0, 0)
    gmem.close()
    mem.close()
    return out["punch"], out["discard"], out["bare"], mapped


if __name__ == "__main__":
    sys.exit(main())
