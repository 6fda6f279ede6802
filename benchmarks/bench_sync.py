"""The cost of `kvmem.sync` in normal runs (no checker): each primitive against the raw
`threading` object or plain attribute access it wraps, in the same run.

Every batch performs 2,048 operations as 256 passes of an 8-fold unrolled body, so the
loop's own cost is small and the same on both sides. Figures (time ratios, lower is
better):
- `with Mutex` / `with threading.Lock()`, and acquire()+release() calls likewise: the
  owner bookkeeping that makes `assert_held` possible (target ≤ 4);
- `Atomic.value` read / plain attribute read: what hot paths (slot lookups, host page
  resolution) pay (target ≤ 1.3);
- `Atomic.load()` / plain attribute read, `Atomic.store()` / attribute store: one
  Python method call (informative);
- `Atomic.add(1)` / `with lock: x += 1` (target ≤ 2);
- an SRCU read section (`read_lock` + `read_unlock`) / `with threading.Lock()`: the
  read side of a grace period, which every accessor enters (target ≤ 4);
- `with RwLock.read()` / `with threading.Lock()`: a read lock (pfn-cache users), whose
  uncontended read side takes no lock — a list append and pop (target ≤ 6).

    python benchmarks/bench_sync.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable

import _common as C

from kvmem import sync

PASSES = 256
UNROLL = 8


class _Plain:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


def batches() -> dict[str, tuple[Callable[[int], None], int]]:
    lock = threading.Lock()
    mutex = sync.Mutex("bench")
    atomic: sync.Atomic[int] = sync.Atomic(0)
    plain = _Plain()
    srcu = sync.Srcu("bench")
    rw = sync.RwLock("bench")
    passes = range(PASSES)

    def with_lock(r: int) -> None:
        for _ in passes:
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701
            with lock: pass  # noqa: E701

    def with_mutex(r: int) -> None:
        for _ in passes:
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701
            with mutex: pass  # noqa: E701

    def lock_calls(r: int) -> None:
        a, rel = lock.acquire, lock.release
        for _ in passes:
            a(); rel(); a(); rel(); a(); rel(); a(); rel()  # noqa: E702
            a(); rel(); a(); rel(); a(); rel(); a(); rel()  # noqa: E702

    def mutex_calls(r: int) -> None:
        a, rel = mutex.acquire, mutex.release
        for _ in passes:
            a(); rel(); a(); rel(); a(); rel(); a(); rel()  # noqa: E702
            a(); rel(); a(); rel(); a(); rel(); a(); rel()  # noqa: E702

    def attr_read(r: int) -> None:
        p = plain
        for _ in passes:
            p.value; p.value; p.value; p.value; p.value; p.value; p.value; p.value  # noqa: B018, E702

    def atomic_value(r: int) -> None:
        a = atomic
        for _ in passes:
            a.value; a.value; a.value; a.value; a.value; a.value; a.value; a.value  # noqa: B018, E702

    def atomic_load(r: int) -> None:
        ld = atomic.load
        for _ in passes:
            ld(); ld(); ld(); ld(); ld(); ld(); ld(); ld()  # noqa: E702

    def attr_store(r: int) -> None:
        p = plain
        for i in passes:
            p.value = i; p.value = i; p.value = i; p.value = i  # noqa: E702
            p.value = i; p.value = i; p.value = i; p.value = i  # noqa: E702

    def atomic_store(r: int) -> None:
        st = atomic.store
        for i in passes:
            st(i); st(i); st(i); st(i); st(i); st(i); st(i); st(i)  # noqa: E702

    def locked_add(r: int) -> None:
        p = plain
        for _ in passes:
            for _ in range(UNROLL):
                with lock:
                    p.value += 1

    def atomic_add(r: int) -> None:
        add = atomic.add
        for _ in passes:
            for _ in range(UNROLL):
                add(1)

    def srcu_section(r: int) -> None:
        lk, ul = srcu.read_lock, srcu.read_unlock
        for _ in passes:
            ul(lk()); ul(lk()); ul(lk()); ul(lk())  # noqa: E702
            ul(lk()); ul(lk()); ul(lk()); ul(lk())  # noqa: E702

    def srcu_inline(r: int) -> None:
        s = srcu
        for _ in passes:
            for _ in range(UNROLL):
                t = s.current
                t.append(None)
                t.pop()

    def rw_read(r: int) -> None:
        read = rw.read
        for _ in passes:
            for _ in range(UNROLL):
                with read():
                    pass

    ops = PASSES * UNROLL
    return {name: (f, ops) for name, f in (
        ("with_lock", with_lock), ("with_mutex", with_mutex), ("lock_calls", lock_calls),
        ("mutex_calls", mutex_calls), ("attr_read", attr_read), ("atomic_value", atomic_value),
        ("atomic_load", atomic_load), ("attr_store", attr_store),
        ("atomic_store", atomic_store), ("locked_add", locked_add), ("atomic_add", atomic_add),
        ("srcu_section", srcu_section), ("srcu_inline", srcu_inline), ("rw_read", rw_read))}


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_sync", "kvmem.sync vs raw threading / attribute access", args.quick)
    rounds = 15 if args.quick else 150
    rep.params = {"ops_per_batch": PASSES * UNROLL, "rounds": rounds}
    C.quiet_gc()
    try:
        s = C.interleave(batches(), rounds)
    finally:
        gc.enable()
    lock = "with threading.Lock()"
    rep.add(C.Figure("with Mutex / with Lock", s["with_mutex"], s["with_lock"], target=4.0,
                     baseline_label=lock, id="mutex_with"))
    rep.add(C.Figure("Mutex acquire+release / Lock's", s["mutex_calls"], s["lock_calls"],
                     target=4.0, baseline_label="Lock.acquire()+release()", id="mutex_calls"))
    rep.add(C.Figure("Atomic.value / attribute read", s["atomic_value"], s["attr_read"],
                     target=1.3, baseline_label="slots attribute read", id="atomic_value"))
    rep.add(C.Figure("Atomic.load() / attribute read", s["atomic_load"], s["attr_read"],
                     baseline_label="slots attribute read", id="atomic_load",
                     note="informative: one Python method call; hot paths read .value"))
    rep.add(C.Figure("Atomic.store() / attribute store", s["atomic_store"], s["attr_store"],
                     baseline_label="slots attribute store", id="atomic_store",
                     note="informative: one Python method call (stores are not hot)"))
    rep.add(C.Figure("Atomic.add(1) / with Lock: x += 1", s["atomic_add"], s["locked_add"],
                     target=2.0, baseline_label="with lock: x += 1", id="atomic_add"))
    rep.add(C.Figure("Srcu read section / with Lock", s["srcu_section"], s["with_lock"],
                     target=4.0, baseline_label=lock, id="srcu_section"))
    rep.add(C.Figure("Srcu read section, inlined / with Lock", s["srcu_inline"],
                     s["with_lock"], target=2.0, baseline_label=lock, id="srcu_inline",
                     note="the hot paths' form: r = current; r.append(None); r.pop()"))
    rep.add(C.Figure("with RwLock.read() / with Lock", s["rw_read"], s["with_lock"],
                     target=6.0, baseline_label=lock, id="rwlock_read",
                     note="uncontended, the read side takes no lock: a list append and "
                          "pop behind two method calls and the guard's"))
    rep.notes.append("per operation, including a share of the unrolled loop; "
                     "uncontended, one thread (the checker is not installed)")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
