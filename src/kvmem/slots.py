"""Memory slots, slot sets, and KVM's rules for changing them.

Rules of this room:
- A `MemorySlot` and a `SlotSet` never change once built (the one exception is the
  generation of a published set, which the writer finalises after the grace period, as
  KVM does). Changing slots means building a new set; publishing it is `memslots`' job.
- Validation is KVM's `kvm_set_memory_region` + x86 `prepare`, as an ordered table of
  (check, errno, message): the first failing row wins, in KVM's order (kvm-semantics §1.3).
- What each kind of change does (§1.4) is one table, `KIND_RULES`: which set operation
  builds the new set, whether the old mapping goes away (an INVALID window for a single
  update, a stage-2 zap, dropped tracking), how the page count moves. The update path,
  the MMU, page tracking and the engines all read it; none dispatches on kinds itself.
  Nothing here publishes, waits or notifies.
- A guest_memfd slot carries its binding (`GmemBinding`: the file and the offset), fixed
  at creation: such a slot can only be deleted (§8.3). This file never looks inside the
  file: `validate` asks the caller's `check_binding` at KVM's step 18 (after the overlap
  check, before x86 `prepare`), and the binding itself is made by the update path above.

Defines `MemorySlot`, `SlotSet`, `Request` (one KVM_SET_USER_MEMORY_REGION or ...REGION2),
`GmemBinding` / `GmemFile`, `Change` (a validated request with its kind), `ChangeKind` /
`KindRule` / `KIND_RULES`, `Limits` (what the VM supports) and `validate`.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ._pindex import IdTable, SortedIndex
from .args import as_u32, as_u64
from .dirty import DirtyBitmap
from .errors import KvmError
from .uapi import (
    DEFAULT_PHYS_BITS,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
    KVM_USER_MEM_SLOTS,
    PAGE_MASK,
    PAGE_SHIFT,
    TASK_SIZE_MAX,
    U16_MAX,
    U64_MAX,
)

__all__ = [
    "KIND_RULES",
    "Change",
    "ChangeKind",
    "GmemBinding",
    "GmemFile",
    "KindRule",
    "Limits",
    "MemorySlot",
    "Request",
    "SlotSet",
    "validate",
]


class GmemFile(Protocol):
    """What the slot layers see of a guest_memfd file (`kvmem.gmem.GuestMemfd` is one)."""

    @property
    def mmap_supported(self) -> bool:
        """Created with GUEST_MEMFD_FLAG_MMAP: a slot bound to it is gmem-only."""


@dataclass(frozen=True, slots=True)
class GmemBinding:
    """A slot's guest_memfd binding (KVM's `slot->gmem`): gfn `base_gfn + i` is page
    `offset // 4096 + i` of `file`. Fixed for the slot's life."""

    file: GmemFile
    offset: int  # guest_memfd_offset, bytes

    @property
    def pgoff(self) -> int:
        return self.offset >> PAGE_SHIFT


@dataclass(frozen=True, slots=True)
class MemorySlot:
    """One memory slot: gfns [base_gfn, end_gfn) of address space `as_id`, backed by host
    memory at [hva, hva + npages*4096). `flags` holds the user flags plus, while a DELETE or
    MOVE is in flight, `KVM_MEMSLOT_INVALID`. A KVM_MEM_GUEST_MEMFD slot also has `gmem`,
    its binding."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    hva: int
    flags: int
    end_gfn: int = field(init=False, repr=False)
    dirty_bitmap: DirtyBitmap | None = field(default=None, repr=False, compare=False)
    gmem: GmemBinding | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end_gfn", self.base_gfn + self.npages)

    @property
    def slot(self) -> int:
        """The ioctl's `slot` field: (as_id << 16) | id."""
        return (self.as_id << 16) | self.id

    @property
    def gpa(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def hva_end(self) -> int:
        return self.hva + (self.npages << PAGE_SHIFT)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def gmem_only(self) -> bool:
        """KVM_MEMSLOT_GMEM_ONLY: bound to a file with GUEST_MEMFD_FLAG_MMAP, so guest code
        runs on the file's pages; host accessors still use the hva (§8.7)."""
        return self.gmem is not None and self.gmem.file.mmap_supported

    def hva_of(self, gfn: int) -> int:
        return self.hva + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def gfn_of(self, hva: int) -> int:
        return self.base_gfn + ((hva - self.hva) >> PAGE_SHIFT)

    def with_flags(self, flags: int) -> MemorySlot:
        return MemorySlot(
            self.id, self.as_id, self.base_gfn, self.npages, self.hva, flags, self.dirty_bitmap,
            self.gmem
        )


MEMO_MAX = 1 << 16  # gfns remembered per slot set


def _hva_key(s: MemorySlot) -> int:
    return (s.hva << 32) | (s.as_id << 16) | s.id


def _hva_end_key(s: MemorySlot) -> int:
    return s.hva_end << 32


class SlotSet:
    """An immutable snapshot of one address space's slots (KVM's `struct kvm_memslots`).

    `generation` is set at publication (with the in-progress bit while the swap is in
    flight) and finalised by the writer; everything else is fixed at construction.

    One lookup, `search`: a gfn → slot memo, then two bisects. A set never changes, so
    memos filled by racing readers are never stale (they are bounded: cleared when full).
    This memo takes the place of KVM's VM-wide and per-vCPU last-used-slot hints, which
    only exist to make lookups cheap and are not observable.

    `read_views` / `write_views` are the accessor layer's memos (`kvmem.access` fills and
    reads them, and registers the set with `host`, whose changes empty them through
    `clear_views`): gfn → a view of the host page; the set only owns their lifetime.
    """

    __slots__ = ("__weakref__", "_by_gfn", "_by_hva", "_by_id", "_deltas", "_memo", "as_id",
                 "generation", "npages", "read_views", "write_views")

    def __init__(
        self,
        as_id: int,
        generation: int,
        by_gfn: SortedIndex[MemorySlot] | None = None,
        by_hva: SortedIndex[MemorySlot] | None = None,
        by_id: IdTable[MemorySlot] | None = None,
        npages: int = 0,
    ) -> None:
        self.as_id = as_id
        self.generation = generation
        self._by_gfn: SortedIndex[MemorySlot] = by_gfn or SortedIndex()
        self._by_hva: SortedIndex[MemorySlot] = by_hva or SortedIndex(_hva_end_key)
        self._by_id: IdTable[MemorySlot] = by_id or IdTable()
        self.npages = npages
        self._memo: dict[int, MemorySlot] = {}
        self._deltas: dict[int, int] = {}  # gfn → hva - gpa of a usable slot (translate)
        # a view of the page
        self.read_views: dict[int, memoryview] = {}
        # (view of the page, the slot if it logs dirty pages else None)
        self.write_views: dict[int, tuple[memoryview, MemorySlot | None]] = {}

    def clear_views(self) -> None:
        """Empty the accessor memos (a host change: see `kvmem.host.register_view_cache`)."""
        self.read_views.clear()
        self.write_views.clear()

    # -- lookups ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_gfn)

    def __iter__(self) -> Iterator[MemorySlot]:
        """Slots in gfn order."""
        return iter(self._by_gfn)

    def by_id(self, slot_id: int) -> MemorySlot | None:
        return self._by_id.get(slot_id)

    def free_ids(self) -> Iterator[int]:
        """Slot ids without a slot, in increasing order."""
        return self._by_id.free()

    def search(self, gfn: int) -> MemorySlot | None:
        """The slot containing `gfn` (INVALID slots included), or None. The hot path of
        every lookup: the memo, then the index's two bisects, inlined here."""
        s = self._memo.get(gfn)
        if s is not None:
            return s
        idx = self._by_gfn
        c = bisect_right(idx.tops, gfn) - 1
        if c < 0:
            return None
        s = idx.chunk_vals[c][bisect_right(idx.chunk_keys[c], gfn) - 1]
        if gfn >= s.end_gfn:
            return None
        memo = self._memo
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[gfn] = s
        return s

    def hva_delta(self, gfn: int) -> int | None:
        """hva − gpa for the page `gfn`, if a usable (not INVALID) slot maps it: the whole
        of a translation."""
        d = self._deltas.get(gfn)
        if d is not None:
            return d
        s = self.search(gfn)
        if s is None or s.flags & KVM_MEMSLOT_INVALID:
            return None
        d = s.hva - (s.base_gfn << PAGE_SHIFT)
        deltas = self._deltas
        if len(deltas) >= MEMO_MAX:
            deltas.clear()
        deltas[gfn] = d
        return d

    def overlapping(self, start_gfn: int, end_gfn: int) -> Iterator[MemorySlot]:
        """Slots meeting [start_gfn, end_gfn), in gfn order (KVM's range iteration)."""
        for s in self._by_gfn.from_key(start_gfn):
            if s.base_gfn >= end_gfn:
                return
            if s.end_gfn > start_gfn:
                yield s

    def by_hva(self, start: int, end: int) -> Iterator[MemorySlot]:
        """Slots whose hva range meets [start, end) (several may alias one hva)."""
        return self._by_hva.overlapping(start << 32, end << 32)

    # -- building ---------------------------------------------------------------------------
    def _derive(self, by_gfn: SortedIndex[MemorySlot], by_hva: SortedIndex[MemorySlot],
                by_id: IdTable[MemorySlot], npages: int) -> SlotSet:
        return SlotSet(self.as_id, self.generation, by_gfn, by_hva, by_id, npages)

    def with_slot(self, new: MemorySlot) -> SlotSet:
        return self._derive(
            self._by_gfn.insert(new.base_gfn, new),
            self._by_hva.insert(_hva_key(new), new),
            self._by_id.set(new.id, new),
            self.npages + new.npages,
        )

    def without(self, old: MemorySlot) -> SlotSet:
        return self._derive(
            self._by_gfn.remove(old.base_gfn),
            self._by_hva.remove(_hva_key(old)),
            self._by_id.set(old.id, None),
            self.npages - old.npages,
        )

    def replacing(self, old: MemorySlot, new: MemorySlot) -> SlotSet:
        return self._derive(
            self._by_gfn.replace(old.base_gfn, new.base_gfn, new),
            self._by_hva.replace(_hva_key(old), _hva_key(new), new),
            self._by_id.set(new.id, new),
            self.npages - old.npages + new.npages,
        )

    def published(self, generation: int) -> SlotSet:
        """The same slots as a new set object carrying `generation` (for a swap)."""
        return SlotSet(self.as_id, generation, self._by_gfn, self._by_hva, self._by_id,
                       self.npages)

    @property
    def in_progress(self) -> bool:
        return bool(self.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)


# --------------------------------------------------------------------------------------------
# Requests and validation


@dataclass(frozen=True, slots=True)
class Limits:
    """What a VM supports: the numbers KVM's checks compare against."""

    address_spaces: int = 2
    max_slots: int = KVM_USER_MEM_SLOTS
    readonly_mem: bool = True
    phys_bits: int = DEFAULT_PHYS_BITS
    user_va_end: int = TASK_SIZE_MAX
    # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: the supported args[0] bits (x86: ENABLE | INITIALLY_SET)
    manual_dirty_log_protect: int = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                     | KVM_DIRTY_LOG_INITIALLY_SET)
    guest_memfd: bool = True  # KVM_CAP_GUEST_MEMFD: KVM_MEM_GUEST_MEMFD slots are valid
    # KVM_CAP_DIRTY_LOG_RING: the largest ring per vCPU in bytes (KVM_DIRTY_RING_MAX_ENTRIES
    # entries of 16 bytes); 0 without rings
    dirty_ring_max_bytes: int = 1 << 20

    @property
    def max_gfn(self) -> int:
        return (1 << (self.phys_bits - PAGE_SHIFT)) - 1


@dataclass(frozen=True, slots=True)
class Request:
    """The fields of `struct kvm_userspace_memory_region`, or of `..._region2` when
    `region2` (then `guest_memfd` is the file the caller named — anything; step 18 judges
    it — and `guest_memfd_offset` its offset; both are ignored without KVM_MEM_GUEST_MEMFD)."""

    slot: int
    flags: int
    gpa: int
    size: int
    hva: int
    region2: bool = False
    guest_memfd: object = None
    guest_memfd_offset: int = 0

    @property
    def as_id(self) -> int:
        return self.slot >> 16

    @property
    def id(self) -> int:
        return self.slot & U16_MAX

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    @property
    def base_gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def guest_memfd_flag(self) -> bool:
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def describe(self) -> str:
        gmem = (f" guest_memfd_offset {self.guest_memfd_offset:#x}"
                if self.guest_memfd_flag else "")
        return (f"slot {self.as_id}:{self.id} flags {self.flags:#x} gpa {self.gpa:#x} "
                f"size {self.size:#x} hva {self.hva:#x}{gmem}")


def make_request(slot: object, flags: object, gpa: object, size: object, hva: object) -> Request:
    """Check the Python-level shape of the arguments (ints within their C field widths)."""
    return Request(as_u32("slot", slot), as_u32("flags", flags), as_u64("gpa", gpa),
                   as_u64("size", size), as_u64("hva", hva))


def make_request2(slot: object, flags: object, gpa: object, size: object, hva: object,
                  guest_memfd: object, guest_memfd_offset: object) -> Request:
    """`make_request` for KVM_SET_USER_MEMORY_REGION2 (the file is judged by step 18)."""
    return Request(as_u32("slot", slot), as_u32("flags", flags), as_u64("gpa", gpa),
                   as_u64("size", size), as_u64("hva", hva), True, guest_memfd,
                   as_u64("guest_memfd_offset", guest_memfd_offset))


class ChangeKind(Enum):
    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    NONE = "none"  # identical request: KVM returns 0 and changes nothing

    @property
    def rule(self) -> KindRule:
        return KIND_RULES[self]


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    as_id: int
    old: MemorySlot | None
    new: MemorySlot | None

    def apply(self, slots: SlotSet) -> SlotSet:
        """The set `slots` becomes with this change."""
        return KIND_RULES[self.kind].apply(slots, self)

    @property
    def page_delta(self) -> int:
        """How the VM's `nr_memslot_pages` moves."""
        return KIND_RULES[self.kind].page_delta(self)

    @property
    def unmaps_old(self) -> bool:
        """The old slot's gfn range stops being mapped by it (DELETE, MOVE)."""
        return KIND_RULES[self.kind].unmaps_old


@dataclass(frozen=True, slots=True)
class KindRule:
    """What a kind of change does (kvm-semantics §1.4).

    `unmaps_old`: the old gfn range stops being mapped by the slot — a single update first
    publishes the slot INVALID and zaps it, a transaction zaps it before its one swap,
    engines drop it, page tracking drops its counters (and, for DELETE, tells notifiers).
    `apply` builds the new set; `page_delta` moves `nr_memslot_pages`.
    """

    unmaps_old: bool
    apply: Callable[[SlotSet, Change], SlotSet]
    page_delta: Callable[[Change], int]


def _create(slots: SlotSet, c: Change) -> SlotSet:
    assert c.new is not None
    return slots.with_slot(c.new)


def _delete(slots: SlotSet, c: Change) -> SlotSet:
    assert c.old is not None
    return slots.without(c.old)


def _replace(slots: SlotSet, c: Change) -> SlotSet:
    assert c.old is not None and c.new is not None
    return slots.replacing(c.old, c.new)


def _unchanged(slots: SlotSet, c: Change) -> SlotSet:
    return slots


def _gained(c: Change) -> int:
    assert c.new is not None
    return c.new.npages


def _lost(c: Change) -> int:
    assert c.old is not None
    return -c.old.npages


def _same(c: Change) -> int:
    return 0


KIND_RULES: dict[ChangeKind, KindRule] = {
    ChangeKind.CREATE: KindRule(False, _create, _gained),
    ChangeKind.DELETE: KindRule(True, _delete, _lost),
    ChangeKind.MOVE: KindRule(True, _replace, _same),
    ChangeKind.FLAGS_ONLY: KindRule(False, _replace, _same),
    ChangeKind.NONE: KindRule(False, _unchanged, _same),
}


# Each row: (check, errno, message). `check(req, limits)` is True when the rule is broken.
_Rule = tuple[Callable[[Request, Limits], bool], int, Callable[[Request, Limits], str]]


def _allowed_flags(flags: int, limits: Limits) -> int:
    """kvm_check_memory_region_flags: a guest_memfd slot neither logs dirty pages nor is
    read-only."""
    if limits.guest_memfd and flags & KVM_MEM_GUEST_MEMFD:
        return KVM_MEM_GUEST_MEMFD
    return KVM_MEM_LOG_DIRTY_PAGES | (KVM_MEM_READONLY if limits.readonly_mem else 0) | (
        KVM_MEM_GUEST_MEMFD if limits.guest_memfd else 0)


def _access_ok(hva: int, size: int, limits: Limits) -> bool:
    end = hva + size
    return end <= limits.user_va_end


REQUEST_RULES: tuple[_Rule, ...] = (
    (lambda r, lim: not r.region2 and bool(r.flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS),
     errno.EINVAL,
     lambda r, lim: f"flags {r.flags:#x} has bits KVM_SET_USER_MEMORY_REGION does not take "
                    "(KVM_MEM_GUEST_MEMFD needs KVM_SET_USER_MEMORY_REGION2)"),
    (lambda r, lim: r.id >= lim.max_slots, errno.EINVAL,
     lambda r, lim: f"slot id {r.id} is not below the {lim.max_slots} user slots"),
    (lambda r, lim: bool(r.flags & ~_allowed_flags(r.flags, lim)), errno.EINVAL,
     lambda r, lim: f"flags {r.flags:#x} not supported by this VM "
                    f"(allowed {_allowed_flags(r.flags, lim):#x}"
                    + (": a guest_memfd slot neither logs dirty pages nor is read-only)"
                       if lim.guest_memfd and r.guest_memfd_flag else ")")),
    (lambda r, lim: bool(r.size & PAGE_MASK), errno.EINVAL,
     lambda r, lim: f"memory_size {r.size:#x} is not a multiple of 4096"),
    (lambda r, lim: bool(r.gpa & PAGE_MASK), errno.EINVAL,
     lambda r, lim: f"guest_phys_addr {r.gpa:#x} is not page-aligned"),
    (lambda r, lim: bool(r.hva & PAGE_MASK), errno.EINVAL,
     lambda r, lim: f"userspace_addr {r.hva:#x} is not page-aligned"),
    (lambda r, lim: not _access_ok(r.hva, r.size, lim), errno.EINVAL,
     lambda r, lim: f"userspace range {r.hva:#x}+{r.size:#x} is not user memory "
                    f"(ends above {lim.user_va_end:#x})"),
    (lambda r, lim: r.guest_memfd_flag and bool(r.guest_memfd_offset & PAGE_MASK),
     errno.EINVAL,
     lambda r, lim: f"guest_memfd_offset {r.guest_memfd_offset:#x} is not page-aligned"),
    (lambda r, lim: r.guest_memfd_flag and r.guest_memfd_offset + r.size > U64_MAX,
     errno.EINVAL,
     lambda r, lim: f"guest_memfd range {r.guest_memfd_offset:#x}+{r.size:#x} wraps the "
                    "64-bit offset space"),
    (lambda r, lim: r.as_id >= lim.address_spaces or r.id >= KVM_MEM_SLOTS_NUM, errno.EINVAL,
     lambda r, lim: f"address space {r.as_id} does not exist "
                    f"(this VM has {lim.address_spaces})"),
    (lambda r, lim: r.gpa + r.size > U64_MAX, errno.EINVAL,
     lambda r, lim: f"guest range {r.gpa:#x}+{r.size:#x} wraps the 64-bit address space"),
    (lambda r, lim: r.npages > KVM_MEM_MAX_NR_PAGES, errno.EINVAL,
     lambda r, lim: f"{r.npages} pages exceed the per-slot limit of {KVM_MEM_MAX_NR_PAGES}"),
)


def check_request(req: Request, limits: Limits) -> None:
    """The checks that need no slot set (kvm-semantics §1.3 rows 2–11, §8.3 row 8), in
    KVM's order."""
    for broken, err, message in REQUEST_RULES:
        if broken(req, limits):
            raise KvmError(err, f"{message(req, limits)} [{req.describe()}]")


# step 18: given the new slot, the file the request named and its offset, the binding
# (checked, not made) or KVM's refusal
CheckBinding = Callable[[MemorySlot, object, int], GmemBinding]


def _no_bindings(slot: MemorySlot, file: object, offset: int) -> GmemBinding:
    raise KvmError(errno.EINVAL, "this VM cannot bind guest_memfd files")


def validate(
    req: Request,
    slots: SlotSet,
    limits: Limits,
    total_pages: int,
    move_refused: Callable[[], str | None] = lambda: None,
    check_binding: CheckBinding = _no_bindings,
) -> Change:
    """Classify `req` against `slots` (its address space's set) or raise KVM's refusal.

    `total_pages` is the VM's `nr_memslot_pages` (all address spaces); `move_refused` is
    x86 `prepare`'s page-track check, returning the reason a MOVE must be refused;
    `check_binding` is kvm_gmem_bind's checks for a KVM_MEM_GUEST_MEMFD CREATE.
    """
    check_request(req, limits)
    old = slots.by_id(req.id)
    if req.size == 0:
        if old is None:
            raise KvmError(errno.EINVAL, f"cannot delete slot {req.as_id}:{req.id}: "
                                         "it does not exist")
        if total_pages < old.npages:
            raise KvmError(errno.EIO, "nr_memslot_pages underflow")
        return Change(ChangeKind.DELETE, req.as_id, old, None)
    if old is None:
        if total_pages + req.npages > U64_MAX:
            raise KvmError(errno.EINVAL, "total guest pages overflow")
        kind = ChangeKind.CREATE
    else:
        if req.guest_memfd_flag:
            raise KvmError(errno.EINVAL, f"slot {req.as_id}:{req.id} exists; a "
                                         "KVM_MEM_GUEST_MEMFD slot can only be created "
                                         "(guest_memfd slots are deleted and created, never "
                                         "changed)")
        if req.hva != old.hva:
            raise KvmError(errno.EINVAL, f"slot {req.as_id}:{req.id} exists with hva "
                                         f"{old.hva:#x}; userspace_addr cannot change")
        if req.npages != old.npages:
            raise KvmError(errno.EINVAL, f"slot {req.as_id}:{req.id} exists with "
                                         f"{old.npages} pages; size cannot change "
                                         "(delete and create, or use a transaction's resize)")
        if (req.flags ^ old.flags) & KVM_MEM_READONLY:
            raise KvmError(errno.EINVAL, f"slot {req.as_id}:{req.id}: KVM_MEM_READONLY "
                                         "cannot change on an existing slot")
        if (req.flags ^ old.flags) & KVM_MEM_GUEST_MEMFD:
            raise KvmError(errno.EINVAL, f"slot {req.as_id}:{req.id} is a guest_memfd slot: "
                                         "it can only be deleted")
        if req.base_gfn != old.base_gfn:
            kind = ChangeKind.MOVE
        elif req.flags != old.flags:
            kind = ChangeKind.FLAGS_ONLY
        else:
            return Change(ChangeKind.NONE, req.as_id, old, old)
    new = MemorySlot(req.id, req.as_id, req.base_gfn, req.npages, req.hva, req.flags)
    if kind in (ChangeKind.CREATE, ChangeKind.MOVE):
        for other in slots.overlapping(new.base_gfn, new.end_gfn):
            if other.id != new.id:
                raise KvmError(errno.EEXIST, f"gfns {new.base_gfn:#x}..{new.end_gfn:#x} of "
                                             f"slot {req.as_id}:{req.id} overlap slot "
                                             f"{other.as_id}:{other.id} "
                                             f"({other.base_gfn:#x}..{other.end_gfn:#x})")
        if req.guest_memfd_flag:  # kvm_gmem_bind, before kvm_set_memslot
            new = MemorySlot(new.id, new.as_id, new.base_gfn, new.npages, new.hva, new.flags,
                             None, check_binding(new, req.guest_memfd,
                                                 req.guest_memfd_offset))
        # x86 kvm_arch_prepare_memory_region
        if kind is ChangeKind.MOVE:
            reason = move_refused()
            if reason is not None:
                raise KvmError(errno.EINVAL, reason)
        if new.end_gfn - 1 > limits.max_gfn:
            raise KvmError(errno.EINVAL, f"slot ends at gfn {new.end_gfn - 1:#x}, beyond the "
                                         f"maximum gfn {limits.max_gfn:#x}")
    return Change(kind, req.as_id, old, new)
