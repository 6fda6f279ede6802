"""Inputs are checked at the door: every public entry point refuses a bad argument before it
changes anything.

A catalogue of bad values — negative, too wide for the field KVM carries the value in (2^64,
2^80; 2^32 for a u32, 2^16 for a slot id), floats (1.0, nan), bools, None, str, bytes, a
list, an arbitrary object — is thrown at every public method of `Vm`, `Transaction`,
`Vcpu`, `HvaCache`, `PfnCache`, `PageTrack` and `HostMemory`, one argument at a time with
the others good. Each call must be refused — `TypeError` for a wrong type, `KvmError(EINVAL)`
(or `ValueError`) for an int that does not fit — with a message naming the argument (or
showing its value), and `fingerprint` — everything a refused call could have touched — must
be the same before and after. The same table called with only good arguments must succeed,
so a method that refused everything would be noticed.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import host
from kvmem.access import HvaCache
from kvmem.contract import EngineCapabilities
from kvmem.cpu import VcpuState

PAGE = kvmem.PAGE_SIZE
U = 256 << 10  # the slot unit of the test VM
AS1 = 1 << 16  # `slot` of address space 1


# -- the world a call is made in ---------------------------------------------------------------


class Opaque:
    """An object that is nothing kvmem expects."""

    def __repr__(self) -> str:
        return "Opaque()"


class Listener(kvmem.SlotsListener):
    pass


class Notifier:
    def track_write(self, gpa: int, data: bytes) -> None:
        pass

    def track_remove_region(self, gfn: int, npages: int) -> None:
        pass


class HalfNotifier:
    """Has `track_write` only: not a page-track notifier."""

    def track_write(self, gpa: int, data: bytes) -> None:
        pass


@dataclass
class World:
    """A VM with every kind of state a call could disturb: slots in both address spaces
    (logging, read-only, mergeable neighbours), dirty bits set and clear, a tracked gfn,
    stage-2 mappings, a vCPU, an hva cache, an active and an idle pfn cache, an open
    transaction with a recorded request, a listener and a page-track notifier."""

    mem: kvmem.HostMemory
    vm: kvmem.Vm
    vcpu: kvmem.Vcpu
    hvc: HvaCache
    gpc: kvmem.PfnCache
    idle: kvmem.PfnCache
    tx: kvmem.Transaction
    listener: Listener
    spare_listener: Listener
    notifier: Notifier
    spare_notifier: Notifier
    path: Path  # where `HostMemory.file` may create a file (none is there)

    def extras(self) -> tuple[object, ...]:
        return (self.mem, self.hvc, self.gpc, self.idle, self.tx, self.path)

    def close(self) -> None:
        self.mem.close()
        if self.path.exists():
            self.path.unlink()


def make_world() -> World:
    mem = kvmem.HostMemory.anonymous(8 * U)
    vm = kvmem.Vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, 2 * U, mem.hva)
    vm.set_memory_region(1, LOG, 2 * U, U, mem.hva + 2 * U)  # continues slot 0: mergeable
    vm.set_memory_region(2, RO, 4 * U, U, mem.hva + 3 * U)
    vm.set_memory_region(AS1 | 3, LOG, 0, U, mem.hva + 4 * U)
    vm.write(0x5000, b"dirty")
    vm.clear_dirty_log(0, 0, 64, b"\x0f" + bytes(7))  # bits 4..63 clear, the rest set
    vm.page_track.add_gfn(7)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0x6000, b"guest")  # a stage-2 mapping
    hvc = vm.hva_cache(0x3000, 16)
    hvc.write(0, b"hva cache")
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    idle = vm.pfn_cache()
    tx = vm.transaction()
    tx.set_memory_region(4, 0, 5 * U, U, mem.hva + 5 * U)
    listener, notifier = Listener(), Notifier()
    vm.add_listener(listener)
    vm.page_track.register(notifier)
    path = Path(tempfile.gettempdir()) / f"kvmem-bad-input-{uuid.uuid4().hex}"
    return World(mem, vm, vcpu, hvc, gpc, idle, tx, listener, Listener(), notifier,
                 Notifier(), path)


def _host_memory_state(mem: kvmem.HostMemory) -> object:
    if mem.closed:
        return "closed"
    prots = tuple(mem.protection(off) for off in range(0, mem.size, PAGE))
    view = mem.view()
    if all(p & host.PROT_READ for p in prots):
        data = bytes(view)
    else:  # never touch a page the process may not read
        data = b"".join(bytes(view[i * PAGE:(i + 1) * PAGE]) if p & host.PROT_READ else b"-"
                        for i, p in enumerate(prots))
    return prots, data


def fingerprint(vm: kvmem.Vm, extras: Sequence[object] = ()) -> dict[str, object]:
    """Everything a refused call could have changed: per address space the generation,
    the slots (with their dirty bits), the write-tracking counters and the stage-2; the
    manual-protect mode, page count, vCPUs, listeners, page-track notifiers, the host change
    epoch and the MMU invalidation sequence; and for each of `extras` — host memory
    (protection of every page, every readable byte), hva caches, pfn caches (including
    whether they are on the VM's list), transactions (recorded requests), paths (exist)."""
    out: dict[str, object] = {
        "manual_dirty_log_protect": vm.manual_dirty_log_protect,
        "dirty_ring_size": vm.dirty_ring_size,
        "dirty rings": tuple((c.dirty_ring.entries, c.dirty_ring.dirty_index,
                              c.dirty_ring.reset_index) for c in vm.vcpus),
        "nr_pages": vm.memslots.nr_pages,
        "vcpus": tuple((c.id, c.smm, c.get_state()) for c in vm.vcpus),
        "listeners": vm.listeners,
        "notifiers": vm.page_track.notifiers,
        "host epoch": host.epoch.load(),
        "mmu seq": vm.mmu.seq.load(),
        "memory attributes": vm.mmu.attributes.load(),
    }
    for a in range(vm.address_spaces):
        out[f"as{a} generation"] = vm.generation(a)
        out[f"as{a} slots"] = tuple(
            (s.id, s.base_gfn, s.npages, s.hva, s.flags,
             None if s.dirty_bitmap is None else s.dirty_bitmap.snapshot())
            for s in vm.slots(a))
        out[f"as{a} tracking"] = tuple((g, vm.page_track.count(g, a))
                                       for g in vm.page_track.tracked_gfns(a))
        out[f"as{a} stage-2"] = vm.mmu.mapped(a)
    gpc_list = vm.mmu.gpc_list.load()
    for i, x in enumerate(extras):
        key = f"extra {i} ({type(x).__name__})"
        if isinstance(x, kvmem.HostMemory):
            out[key] = _host_memory_state(x)
        elif isinstance(x, kvmem.PfnCache):
            out[key] = (x.active, x.valid, x.gpa, x.uhva, x.generation, x.frame, x.memslot,
                        any(c is x for c in gpc_list))
        elif isinstance(x, HvaCache):
            out[key] = (x.gpa, x.len, x.hva, x.generation, x.memslot)
        elif isinstance(x, kvmem.Transaction):
            out[key] = (x.requests, len(x))
        elif isinstance(x, Path):
            out[key] = x.exists()
        else:
            raise AssertionError(f"no fingerprint for {x!r}")
    return out


# -- the catalogue of bad values ---------------------------------------------------------------

Expect = Literal["type", "range"]


@dataclass(frozen=True)
class Bad:
    """A bad value and the refusal it deserves: "type" → TypeError; "range" → KvmError
    with EINVAL (or ValueError). `names`: more words a message may name it by (a field
    inside a container)."""

    value: object
    expect: Expect
    names: tuple[str, ...] = ()

    def shows(self) -> tuple[str, ...]:
        v = self.value
        if isinstance(v, list | tuple) and v:
            v = v[0]
        if type(v) is int:
            return (str(v), hex(v))
        return ()

    def __repr__(self) -> str:
        return f"{self.value!r:.60}"


def _types(*values: object) -> list[Bad]:
    return [Bad(v, "type") for v in values]


def _ranges(*values: object, names: tuple[str, ...] = ()) -> list[Bad]:
    return [Bad(v, "range", names) for v in values]


NOT_INTS = (1.0, 1.5, math.nan, math.inf, True, False, None, "0", b"\0", [0], Opaque())
NOT_U64 = (-1, -(1 << 70), 1 << 64, (1 << 64) + PAGE, 1 << 80)
NOT_SEQUENCES = ("ab", b"\0\0", None, 5, 1.5, Opaque(), {0: 0})
REGION = (3, 0, 0, U, 0)

CATALOGUE: dict[str, list[Bad]] = {
    "u64": _ranges(*NOT_U64) + _types(*NOT_INTS),
    "u32": _ranges(*NOT_U64, 1 << 32) + _types(*NOT_INTS),
    "u16": _ranges(*NOT_U64, 1 << 32, 1 << 16, 70000) + _types(*NOT_INTS),
    "as_id": _ranges(*NOT_U64, 2, 1 << 16) + _types(*NOT_INTS),
    "prot": _ranges(*NOT_U64, 2, 4, 5, 7) + _types(*NOT_INTS),
    "size": _ranges(-PAGE, 0, 1, PAGE + 1, 1 << 63, 1 << 64, 1 << 80) + _types(*NOT_INTS),
    "bool": _types(0, 1, None, "yes", "", 1.0, math.nan, b"\x01", [True], Opaque()),
    "bytes": _types("text", 7, None, 1.0, True, [1, 2], Opaque()),
    "listener": _types(None, Opaque(), 5, "listener", Notifier()),
    "state": _types(None, Opaque(), 5, "state", b"\0" * 64),
    "notifier": _types(None, Opaque(), 5, "notifier", HalfNotifier(), Listener()),
    "gpas": _types(*NOT_SEQUENCES, [1.5], [None], [True], ["0"])
    + _ranges([-1], [1 << 64], [1 << 80]),
    # None is `split`'s default (the lowest free ids), so it is not among them
    "ids": _types(*(v for v in NOT_SEQUENCES if v is not None), [1.5], [None], [True])
    + _ranges([-1], [70000], [1 << 16], [9, 9]),
    "slots": _types(*NOT_SEQUENCES, [0, 1.0], [0, None], [True, 1])
    + _ranges([0, -1], [0, 1 << 32], [0, 0]),
    "regions": [
        *_types("x", None, 5, Opaque(), b""),
        Bad([(1, 2)], "type", ("regions",)),
        Bad([list(REGION)], "type", ("regions",)),
        Bad([(True, *REGION[1:])], "type", ("regions", "id")),
        Bad([(3, 1.0, *REGION[2:])], "type", ("flags",)),
        Bad([(*REGION[:4], None)], "type", ("hva",)),
        Bad([(70000, *REGION[1:])], "range", ("regions", "id")),
        Bad([(3, 0, -1, U, 0)], "range", ("gpa",)),
        Bad([(3, 0, 0, 1 << 64, 0)], "range", ("size",)),
        Bad([REGION, (3, 0, U, U, 0)], "range", ("regions", "twice")),
    ],
    # Vm(...)
    "vm.address_spaces": _ranges(-1, 0, 3, 1 << 64) + _types(*(v for v in NOT_INTS
                                                               if v is not None)),
    "vm.max_slots": _ranges(-1, 0, 32765, 1 << 32, 1 << 64) + _types(*NOT_INTS),
    "vm.phys_bits": _ranges(-1, 0, 12, 65, 1 << 64) + _types(*(v for v in NOT_INTS
                                                            if v is not None)),
    "vm.user_va_end": _ranges(-1, -PAGE, 0, PAGE + 1, (1 << 64) + PAGE, 1 << 80)
    + _types(*NOT_INTS),
    "vm.engine": _types(5, 1.0, True, b"kvm", ["kvm"], Opaque()),
    # with an engine (VM_PARAMS has one) a private-memory type is refused too
    "vm.vm_type": _types(None, 0, 1, True, b"default", ["default"], Opaque())
    + _ranges("", "bogus", "DEFAULT", "sw_protected"),
}
CATALOGUE["gfn"] = CATALOGUE["u64"]
# None is `merge`'s default slot id (the first slot's)
CATALOGUE["slot_id"] = [b for b in CATALOGUE["u16"] if b.value is not None]

_WIDTH = {"u64": 64, "gfn": 64, "u32": 32, "u16": 16, "slot_id": 16}
_not_int_or_none = st.one_of(st.floats(), st.booleans(), st.text(max_size=3),
                             st.binary(max_size=3), st.lists(st.integers(), max_size=2),
                             st.just(Opaque()))


def bad_strategy(kind: str) -> st.SearchStrategy[Bad]:
    """Random bad values of `kind` (the catalogue's, and more like them)."""
    fixed = st.sampled_from(CATALOGUE[kind])
    typed = (_not_int_or_none if kind == "slot_id" else _not_int_or_none | st.none()).map(
        lambda v: Bad(v, "type"))
    if kind in _WIDTH:
        wide = st.integers(max_value=-1) | st.integers(min_value=1 << _WIDTH[kind])
        return fixed | typed | wide.map(lambda v: Bad(v, "range"))
    if kind == "as_id":
        return fixed | typed | (st.integers(max_value=-1) | st.integers(min_value=2)).map(
            lambda v: Bad(v, "range"))
    if kind == "prot":
        return fixed | typed | st.integers().filter(lambda v: v not in (0, 1, 3)).map(
            lambda v: Bad(v, "range"))
    if kind == "bool":
        return fixed | st.one_of(st.integers(), st.floats(), st.none(), st.text(max_size=3),
                                 st.just(Opaque())).map(lambda v: Bad(v, "type"))
    if kind == "bytes":
        return fixed | st.one_of(st.integers(), st.floats(), st.none(), st.text(max_size=3),
                                 st.booleans()).map(lambda v: Bad(v, "type"))
    if kind in ("gpas", "ids", "slots"):
        inner = bad_strategy("u64" if kind == "gpas" else "u32")
        first = [0] if kind == "slots" else []
        return fixed | inner.map(lambda b: Bad([*first, b.value], b.expect))
    return fixed


# -- the table of entry points -----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str  # what a refusal names it by
    kind: str  # its catalogue
    good: object  # a good value, or a function of the world giving one

    def good_value(self, w: World) -> object:
        return self.good(w) if callable(self.good) else self.good


@dataclass(frozen=True)
class Entry:
    name: str
    call: Callable[..., object]  # (world, *args)
    params: tuple[Param, ...] = field(default=())

    def __repr__(self) -> str:
        return self.name


def E(name: str, call: Callable[..., object], *params: Param) -> Entry:
    return Entry(name, call, params)


def P(name: str, kind: str, good: object) -> Param:
    return Param(name, kind, good)


def _hva(offset: int) -> Callable[[World], int]:
    return lambda w: w.mem.hva + offset


def _check(w: World, length: object) -> bool:
    with w.gpc.rwlock.read():
        return w.gpc.check(length)  # type: ignore[arg-type]


def _lock(w: World, length: object, dirty: object) -> bytes:
    with w.gpc.lock(length, dirty=dirty) as view:  # type: ignore[arg-type]
        return bytes(view)


def _acquire(w: World, length: object) -> bytes:
    view = w.gpc.acquire(length)  # type: ignore[arg-type]
    try:
        return bytes(view)
    finally:
        w.gpc.release()


def _release(w: World) -> None:
    w.gpc.acquire(8)
    w.gpc.release()


def _set_smm(w: World, value: object) -> None:
    w.vcpu.smm = value  # type: ignore[assignment]


REGION_ARGS = (P("slot", "u32", 5), P("flags", "u32", 0), P("gpa", "u64", 6 * U),
               P("size", "u64", U), P("hva", "u64", _hva(6 * U)))

ENTRIES: list[Entry] = [
    # Vm
    E("Vm.set_memory_region", lambda w, *a: w.vm.set_memory_region(*a), *REGION_ARGS),
    E("Vm.read", lambda w, g, n: w.vm.read(g, n), P("gpa", "u64", 0x5000),
      P("length", "u64", 16)),
    E("Vm.write", lambda w, g, d: w.vm.write(g, d), P("gpa", "u64", 0x5000),
      P("data", "bytes", b"w")),
    E("Vm.clear", lambda w, g, n: w.vm.clear(g, n), P("gpa", "u64", 0x5000),
      P("length", "u64", 0x100)),
    E("Vm.translate", lambda w, g: w.vm.translate(g), P("gpa", "u64", 0x5000)),
    E("Vm.lookup", lambda w, g, a: w.vm.lookup(g, a), P("gfn", "gfn", 5),
      P("as_id", "as_id", 1)),
    E("Vm.slot_set", lambda w, a: w.vm.slot_set(a), P("as_id", "as_id", 1)),
    E("Vm.slots", lambda w, a: w.vm.slots(a), P("as_id", "as_id", 1)),
    E("Vm.generation", lambda w, a: w.vm.generation(a), P("as_id", "as_id", 1)),
    E("Vm.hva_to_gfn_ranges", lambda w, s, e: list(w.vm.hva_to_gfn_ranges(s, e)),
      P("start", "u64", _hva(0)), P("end", "u64", _hva(U))),
    E("Vm.hva_cache", lambda w, g, n: w.vm.hva_cache(g, n), P("gpa", "u64", 0x4000),
      P("length", "u64", 32)),
    E("Vm.pfn_cache", lambda w: w.vm.pfn_cache()),
    E("Vm.create_vcpu", lambda w, i: w.vm.create_vcpu(i), P("vcpu_id", "u32", 1)),
    E("Vm.get_dirty_log", lambda w, s: w.vm.get_dirty_log(s), P("slot", "u32", 0)),
    E("Vm.clear_dirty_log", lambda w, *a: w.vm.clear_dirty_log(*a), P("slot", "u32", 0),
      P("first_page", "u64", 0), P("num_pages", "u32", 64), P("bitmap", "bytes", b"\xff" * 8)),
    E("Vm.enable_manual_dirty_log_protect",
      lambda w, i: w.vm.enable_manual_dirty_log_protect(initially_set=i),
      P("initially_set", "bool", False)),
    E("Vm.disable_manual_dirty_log_protect", lambda w: w.vm.disable_manual_dirty_log_protect()),
    E("Vm.enable_cap_manual_dirty_log_protect",
      lambda w, a, f: w.vm.enable_cap_manual_dirty_log_protect(a, f),
      P("args[0]", "u64", 1), P("flags", "u32", 0)),
    E("Vm.invalidate_hva_range", lambda w, s, e: w.vm.invalidate_hva_range(s, e),
      P("start", "u64", _hva(0)), P("end", "u64", _hva(PAGE))),
    E("Vm.add_listener", lambda w, x: w.vm.add_listener(x),
      P("listener", "listener", lambda w: w.spare_listener)),
    E("Vm.remove_listener", lambda w, x: w.vm.remove_listener(x),
      P("listener", "listener", lambda w: w.listener)),
    E("Vm.transaction", lambda w: w.vm.transaction()),
    E("Vm.set_memory_region2",
      lambda w, *a: w.vm.set_memory_region2(*a[:5], guest_memfd_offset=a[5]),
      *REGION_ARGS, P("guest_memfd_offset", "u64", 0)),
    E("Vm.create_guest_memfd", lambda w, n, f: w.vm.create_guest_memfd(n, f),
      P("size", "u64", 2 * U), P("flags", "u64", 0)),
    E("Vm.get_memory_attributes", lambda w, g: w.vm.get_memory_attributes(g),
      P("gpa", "u64", 0x5000)),
    # Transaction
    E("Transaction.set_memory_region", lambda w, *a: w.tx.set_memory_region(*a), *REGION_ARGS),
    E("Transaction.set_memory_region2",
      lambda w, *a: w.tx.set_memory_region2(*a[:5], guest_memfd_offset=a[5]),
      *REGION_ARGS, P("guest_memfd_offset", "u64", 0)),
    E("Transaction.delete", lambda w, s: w.tx.delete(s), P("slot", "u32", 1)),
    E("Transaction.split", lambda w, s, at, ids: w.tx.split(s, at, ids), P("slot", "u32", 0),
      P("at", "gpas", [U]), P("ids", "ids", [9])),
    E("Transaction.merge", lambda w, s, i: w.tx.merge(s, i), P("slot", "slots", [0, 1]),
      P("slot_id", "slot_id", 0)),
    E("Transaction.resize", lambda w, s, n: w.tx.resize(s, n), P("slot", "u32", 1),
      P("size", "u64", 2 * U)),
    E("Transaction.set_readonly", lambda w, s, r: w.tx.set_readonly(s, r), P("slot", "u32", 1),
      P("readonly", "bool", True)),
    E("Transaction.replace_layout", lambda w, a, r: w.tx.replace_layout(a, r),
      P("as_id", "as_id", 1),
      P("regions", "regions", lambda w: [(3, LOG, 0, 2 * U, w.mem.hva + 4 * U)])),
    E("Transaction.commit", lambda w: w.tx.commit()),
    # Vcpu
    E("Vcpu.read", lambda w, g, n: w.vcpu.read(g, n), P("gpa", "u64", 0x5000),
      P("length", "u64", 16)),
    E("Vcpu.write", lambda w, g, d: w.vcpu.write(g, d), P("gpa", "u64", 0x5000),
      P("data", "bytes", b"v")),
    E("Vcpu.clear", lambda w, g, n: w.vcpu.clear(g, n), P("gpa", "u64", 0x5000),
      P("length", "u64", 0x100)),
    E("Vcpu.guest_read", lambda w, g, n: w.vcpu.guest_read(g, n), P("gpa", "u64", 0x6000),
      P("length", "u64", 8)),
    E("Vcpu.guest_write", lambda w, g, d: w.vcpu.guest_write(g, d), P("gpa", "u64", 0x6000),
      P("data", "bytes", b"g")),
    E("Vcpu.translate", lambda w, g: w.vcpu.translate(g), P("gpa", "u64", 0x5000)),
    E("Vcpu.lookup", lambda w, g: w.vcpu.lookup(g), P("gfn", "gfn", 5)),
    E("Vcpu.fault_in", lambda w, g, x: w.vcpu.fault_in(g, x), P("gpa", "u64", 0x5000),
      P("write", "bool", True)),
    E("Vcpu.smm", _set_smm, P("smm", "bool", True)),
    E("Vcpu.set_state", lambda w, x: w.vcpu.set_state(x), P("state", "state", VcpuState())),
    E("Vcpu.translate_gva", lambda w, g: w.vcpu.translate_gva(g), P("gva", "u64", 0x5000)),
    E("Vcpu.read_virt", lambda w, g, n, u: w.vcpu.read_virt(g, n, user=u),
      P("gva", "u64", 0x5000), P("n", "u32", 16), P("user", "bool", False)),
    E("Vcpu.write_virt", lambda w, g, d, u: w.vcpu.write_virt(g, d, user=u),
      P("gva", "u64", 0x5000), P("data", "bytes", b"v"), P("user", "bool", False)),
    # HvaCache
    E("HvaCache.read", lambda w, o, n: w.hvc.read(o, n), P("offset", "u64", 0),
      P("length", "u64", 16)),
    E("HvaCache.write", lambda w, o, d: w.hvc.write(o, d), P("offset", "u64", 0),
      P("data", "bytes", b"h")),
    # PfnCache
    E("PfnCache.activate", lambda w, g, n: w.idle.activate(g, n), P("gpa", "u64", 0x1000),
      P("length", "u64", 8)),
    E("PfnCache.activate_hva", lambda w, h, n: w.idle.activate_hva(h, n),
      P("hva", "u64", _hva(0x1000)), P("length", "u64", 8)),
    E("PfnCache.refresh", lambda w, n: w.gpc.refresh(n), P("length", "u64", 8)),
    E("PfnCache.check", _check, P("length", "u64", 8)),
    E("PfnCache.lock", _lock, P("length", "u64", 8), P("dirty", "bool", True)),
    E("PfnCache.acquire", _acquire, P("length", "u64", 8)),
    E("PfnCache.release", _release),
    E("PfnCache.deactivate", lambda w: w.gpc.deactivate()),
    # PageTrack
    E("PageTrack.register", lambda w, n: w.vm.page_track.register(n),
      P("notifier", "notifier", lambda w: w.spare_notifier)),
    E("PageTrack.unregister", lambda w, n: w.vm.page_track.unregister(n),
      P("notifier", "notifier", lambda w: w.notifier)),
    E("PageTrack.add_gfn", lambda w, g, a: w.vm.page_track.add_gfn(g, a), P("gfn", "gfn", 8),
      P("as_id", "as_id", 0)),
    E("PageTrack.remove_gfn", lambda w, g, a: w.vm.page_track.remove_gfn(g, a),
      P("gfn", "gfn", 7), P("as_id", "as_id", 0)),
    E("PageTrack.is_tracked", lambda w, g, a: w.vm.page_track.is_tracked(g, a),
      P("gfn", "gfn", 7), P("as_id", "as_id", 0)),
    E("PageTrack.count", lambda w, g, a: w.vm.page_track.count(g, a), P("gfn", "gfn", 7),
      P("as_id", "as_id", 0)),
    E("PageTrack.tracked_gfns", lambda w, a: w.vm.page_track.tracked_gfns(a),
      P("as_id", "as_id", 1)),
    E("PageTrack.write", lambda w, a, g, d: w.vm.page_track.write(a, g, d),
      P("as_id", "as_id", 0), P("gpa", "u64", 0x7000), P("data", "bytes", b"t")),
    # HostMemory
    E("HostMemory.discard", lambda w, o, n: w.mem.discard(o, n), P("offset", "u64", 6 * U),
      P("length", "u64", PAGE)),
    E("HostMemory.remap", lambda w, o, n: w.mem.remap(o, n), P("offset", "u64", 6 * U),
      P("length", "u64", PAGE)),
    E("HostMemory.protect", lambda w, o, n, p: w.mem.protect(o, n, p),
      P("offset", "u64", 6 * U), P("length", "u64", PAGE), P("prot", "prot", host.PROT_READ)),
    E("HostMemory.protection", lambda w, o: w.mem.protection(o), P("offset", "u64", 0)),
    E("HostMemory.anonymous", lambda w, n: kvmem.HostMemory.anonymous(n),
      P("size", "size", PAGE)),
    E("HostMemory.memfd", lambda w, n: kvmem.HostMemory.memfd(n), P("size", "size", PAGE)),
    E("HostMemory.file", lambda w, n: kvmem.HostMemory.file(w.path, n),
      P("size", "size", PAGE)),
]

CASES = [(e, i, bad) for e in ENTRIES for i, p in enumerate(e.params)
         for bad in CATALOGUE[p.kind]]
BAD_CALLS = [e for e in ENTRIES if e.params]


def _dispose(result: object) -> None:
    """Release what a call that should have been refused made anyway."""
    if isinstance(result, kvmem.HostMemory):
        result.close()


def wrong_refusal(exc: BaseException | None, param: Param, bad: Bad) -> str | None:
    """None if `exc` is the refusal `bad` deserves, else what is wrong with it."""
    if exc is None:
        return "accepted"
    msg = str(exc)
    names = (param.name, *bad.names)
    named = any(n in msg for n in names)
    if bad.expect == "type":
        if type(exc) is not TypeError:
            return f"{type(exc).__name__} ({msg}), not TypeError"
        return None if named else f"TypeError does not name {param.name}: {msg}"
    if isinstance(exc, kvmem.KvmError):
        if exc.errno != errno.EINVAL:
            return f"KvmError {errno.errorcode.get(exc.errno or 0)} ({msg}), not EINVAL"
    elif type(exc) is not ValueError:
        return f"{type(exc).__name__} ({msg}), not KvmError(EINVAL) or ValueError"
    shown = any(s in msg for s in bad.shows())
    return None if named or shown else f"refusal names neither {param.name} nor the value: {msg}"


def try_bad(w: World, entry: Entry, index: int, bad: Bad) -> list[str]:
    """Call `entry` with `bad` as argument `index` (the others good): what went wrong."""
    args = [p.good_value(w) for p in entry.params]
    args[index] = bad.value
    before = fingerprint(w.vm, w.extras())
    exc: BaseException | None = None
    try:
        _dispose(entry.call(w, *args))
    except Exception as e:  # any exception: wrong_refusal judges it
        exc = e
    after = fingerprint(w.vm, w.extras())
    problems = []
    what = wrong_refusal(exc, entry.params[index], bad)
    if what is not None:
        problems.append(what)
    changed = [k for k in before if before[k] != after.get(k)]
    if changed:
        problems.append(f"changed {', '.join(changed)}")
    return [f"{entry.name}({entry.params[index].name}={bad!r}): {p}" for p in problems]


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world()
    try:
        yield w
    finally:
        w.close()


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=repr)
def test_good_arguments_are_accepted(world: World, entry: Entry) -> None:
    """The baseline: every entry point of the table works with its good arguments (so a
    method that refused everything would not pass the sweep below)."""
    _dispose(entry.call(world, *(p.good_value(world) for p in entry.params)))


def test_every_entry_point_refuses_every_bad_value_and_changes_nothing() -> None:
    """The sweep: every catalogued bad value at every argument of every entry point."""
    failures: list[str] = []
    for entry in BAD_CALLS:
        w = make_world()
        try:
            for index, p in enumerate(entry.params):
                for bad in CATALOGUE[p.kind]:
                    problems = try_bad(w, entry, index, bad)
                    if problems:  # the next case gets an undisturbed world
                        failures += problems
                        w.close()
                        w = make_world()
        finally:
            w.close()
    assert not failures, f"{len(failures)} of {len(CASES)} cases:\n" + "\n".join(failures)


@st.composite
def bad_call(draw: st.DrawFn) -> tuple[Entry, int, Bad]:
    entry = draw(st.sampled_from(BAD_CALLS))
    index = draw(st.integers(0, len(entry.params) - 1))
    return entry, index, draw(bad_strategy(entry.params[index].kind))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_call())
def test_bad_arguments_change_nothing(call: tuple[Entry, int, Bad]) -> None:
    """The property: a random bad value at a random argument of a random entry point is
    refused and leaves the fingerprint as it was."""
    w = make_world()
    try:
        assert try_bad(w, *call) == []
    finally:
        w.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3),
                          st.integers(0, 16).map(lambda p: p * U // 2),
                          st.integers(0, 8).map(lambda p: p * U // 2),
                          st.integers(0, 3)), min_size=1, max_size=8))
def test_refused_transaction_changes_nothing(reqs: list[tuple[int, int, int, int, int]]) -> None:
    w = make_world()
    try:
        vm = w.vm
        before = fingerprint(vm, w.extras())
        try:
            with vm.transaction() as tx:
                for sid, flags, gpa, size, h in reqs:
                    tx.set_memory_region(sid, flags, gpa, size, w.mem.hva + h * U)
        except kvmem.TransactionError as e:
            assert 0 <= e.index < len(reqs)
            assert fingerprint(vm, w.extras()) == before
    finally:
        w.close()


# -- Vm(...) -----------------------------------------------------------------------------------


class FakeEngine:
    name = "fake"

    def __init__(self) -> None:
        self.capabilities = EngineCapabilities("fake", 2, 32764, True, True, True)
        self.attached: list[kvmem.Vm] = []
        self.closed = False

    def attach(self, vm: kvmem.Vm) -> None:
        self.attached.append(vm)

    def close(self) -> None:
        self.closed = True


VM_PARAMS = (P("address_spaces", "vm.address_spaces", 2), P("max_slots", "vm.max_slots", 100),
             P("readonly_mem", "bool", False), P("phys_bits", "vm.phys_bits", 48),
             P("user_va_end", "vm.user_va_end", 1 << 40), P("engine", "vm.engine", "fake"),
             P("vm_type", "vm.vm_type", "default"))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[FakeEngine]:
    """Every engine `Vm(engine=...)` opens from now on."""
    from kvmem import vm as vm_mod
    engines: list[FakeEngine] = []

    def opener(name: str) -> FakeEngine:
        engines.append(FakeEngine())
        return engines[-1]

    monkeypatch.setattr(vm_mod, "_engine_opener", opener)
    return engines


def test_vm_accepts_good_arguments_and_opens_its_engine(opened: list[FakeEngine]) -> None:
    vm = kvmem.Vm(**{p.name: p.good for p in VM_PARAMS})  # type: ignore[arg-type]
    assert (vm.address_spaces, vm.limits.max_slots, vm.limits.phys_bits) == (2, 100, 48)
    engine: object = vm.engine
    assert len(opened) == 1 and opened[0].attached == [vm] and engine is opened[0]


@pytest.mark.parametrize(("param", "bad"), [(p, b) for p in VM_PARAMS for b in CATALOGUE[p.kind]],
                         ids=lambda x: x.name if isinstance(x, Param) else repr(x))
def test_bad_vm_arguments_are_refused_before_an_engine_opens(
        opened: list[FakeEngine], param: Param, bad: Bad) -> None:
    kwargs = {p.name: p.good for p in VM_PARAMS}
    kwargs[param.name] = bad.value
    exc: Exception | None = None
    try:
        kvmem.Vm(**kwargs)  # type: ignore[arg-type]
    except Exception as e:
        exc = e
    assert wrong_refusal(exc, param, bad) is None, wrong_refusal(exc, param, bad)
    assert opened == []


def test_bad_vm_arguments_open_no_engine(opened: list[FakeEngine]) -> None:
    for kwargs in ({"max_slots": 0}, {"phys_bits": 99}, {"address_spaces": 3},
                   {"address_spaces": "2"}, {"user_va_end": -1}):
        with pytest.raises((kvmem.KvmError, TypeError)):
            kvmem.Vm(engine="unicorn", **kwargs)
    assert opened == []


# -- the reported bugs, one by one -------------------------------------------------------------


def refused(err: int | type[Exception], call: Callable[[], object]) -> BaseException:
    kind = err if isinstance(err, type) else kvmem.KvmError
    with pytest.raises(kind) as info:
        call()
    if not isinstance(err, type):
        assert isinstance(info.value, kvmem.KvmError) and info.value.errno == err
    return info.value


def test_split_with_a_too_wide_id_records_nothing(world: World) -> None:
    tx = world.tx
    before = tx.requests
    e = refused(errno.EINVAL, lambda: tx.split(0, [U], ids=[70000]))
    assert "ids[0]" in str(e)
    assert tx.requests == before


def test_replace_layout_with_duplicate_ids_records_nothing(world: World) -> None:
    tx = world.tx
    before = tx.requests
    refused(errno.EINVAL, lambda: tx.replace_layout(0, [(1, 0, 0, U, world.mem.hva),
                                                        (1, 0, U, U, world.mem.hva)]))
    assert tx.requests == before


def test_add_listener_none_is_type_error(world: World) -> None:
    refused(TypeError, lambda: world.vm.add_listener(None))  # type: ignore[arg-type]
    refused(TypeError, lambda: world.vm.remove_listener(None))  # type: ignore[arg-type]
    assert world.vm.listeners == (world.listener,)


def test_protect_with_a_float_is_type_error_and_keeps_the_protection(world: World) -> None:
    mem = world.mem
    mem.protect(PAGE, PAGE, host.PROT_READ)
    before = _host_memory_state(mem)
    e = refused(TypeError, lambda: mem.protect(0, 2 * PAGE, 1.0))  # type: ignore[arg-type]
    assert "prot" in str(e)
    assert _host_memory_state(mem) == before
    assert (mem.protection(0), mem.protection(PAGE)) == (host.PROT_RW, host.PROT_READ)


@pytest.mark.parametrize("n", [2**64, 2**64 - 0x1000 + 1, 2**80])
def test_clear_past_2_pow_64_is_refused_before_zeroing_anything(world: World, n: int) -> None:
    """kvm_clear_guest's length is an unsigned long: a length that does not fit it, or that
    runs past the top of the guest physical address space, is refused up front."""
    vm = world.vm
    vm.write(0x1000, b"keep me")
    before = fingerprint(vm, world.extras())
    for clear in (vm.clear, world.vcpu.clear):
        refused(errno.EINVAL, lambda c=clear: c(0x1000, n))  # type: ignore[misc]
    assert vm.read(0x1000, 7) == b"keep me"
    assert fingerprint(vm, world.extras()) == before


def test_clear_up_to_2_pow_64_still_stops_at_the_first_hole(world: World) -> None:
    """A length that fits stays KVM's: pages before the first hole are zeroed, then EFAULT."""
    vm = world.vm
    vm.write(0x1000, b"zero me")
    e = refused(errno.EFAULT, lambda: vm.clear(0x1000, 2**64 - 0x1000))
    assert isinstance(e, kvmem.GuestAccessError) and e.gpa == 3 * U
    assert vm.read(0x1000, 7) == bytes(7)


def test_hva_cache_past_2_pow_64_is_einval() -> None:
    """KVM's __kvm_gfn_to_hva_cache_init: gpa + len - 1 wraps, end_gfn < start_gfn: EINVAL."""
    vm = kvmem.Vm(phys_bits=64)
    for gpa, n in ((2**64 - 1, 2), (2**64 - PAGE, PAGE + 1), (0, 2**64 + 1)):
        refused(errno.EINVAL, lambda g=gpa, k=n: vm.hva_cache(g, k))  # type: ignore[misc]


def test_pfn_cache_check_and_lock_refuse_a_negative_length(world: World) -> None:
    gpc = world.gpc
    with gpc.rwlock.read():
        assert gpc.check(8)
        try:
            ok: object = gpc.check(-1)
        except kvmem.KvmError as e:
            ok = e.errno
    assert ok is not True
    before = fingerprint(world.vm, world.extras())
    refused(errno.EINVAL, lambda: gpc.lock(-1))
    refused(TypeError, lambda: gpc.lock(8, dirty="yes"))  # type: ignore[arg-type]
    assert fingerprint(world.vm, world.extras()) == before


def test_lookup_in_a_negative_address_space_is_einval(world: World) -> None:
    refused(errno.EINVAL, lambda: world.vm.lookup(0, as_id=-1))


def test_vm_with_a_negative_user_va_end_is_refused() -> None:
    refused(errno.EINVAL, lambda: kvmem.Vm(user_va_end=-1))


def test_none_is_not_a_flag(world: World) -> None:
    refused(TypeError, lambda: world.vm.enable_manual_dirty_log_protect(
        initially_set=None))  # type: ignore[arg-type]
    refused(TypeError, lambda: world.tx.set_readonly(0, None))  # type: ignore[arg-type]
    refused(TypeError, lambda: world.gpc.lock(8, dirty="yes"))  # type: ignore[arg-type]
    assert world.vm.manual_dirty_log_protect == 3 and len(world.tx) == 1


def test_translate_of_a_float_names_gpa(world: World) -> None:
    e = refused(TypeError, lambda: world.vm.translate(1.5))  # type: ignore[arg-type]
    assert "gpa" in str(e) and "1.5" in str(e)


def test_host_memory_file_with_a_bad_size_creates_no_file(world: World) -> None:
    for size in (0, PAGE + 1, 1 << 63, 1 << 80):
        refused(errno.EINVAL, lambda s=size: kvmem.HostMemory.file(world.path, s))  # type: ignore[misc]
        assert not os.path.exists(world.path)
