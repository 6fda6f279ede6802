"""Guest memory accessors (kvm-semantics §3): read / write / clear by gpa, and the hva cache.

Defines `GuestMemory` — the one accessor path, for one address space of one VM: the `Vm`
(address space 0), every `Vcpu` (the address space it is in) and the hva cache's slow path
all copy through it — and `HvaCache` (KVM's gfn_to_hva_cache).

Rules of this room:
- Every copy runs inside one read section of `host.guard`, and so does the slot lookup
  it copies for. `Memslots.grace_period` waits for that section: once a slot update
  returns, no copy is still using the old mapping. Host changes that make memory
  inaccessible (protect, remap, close) wait for it too.
- KVM walks page by page; the general path walks *slot runs*: the longest stretch of the
  request that one slot backs, merged into one copy where runs continue each other in
  host memory. The result is KVM's: the first page that fails stops the access with
  EFAULT, earlier pages stay written, and written pages of dirty-logging slots are marked
  through the `mark` the owner gives (a VM's `DirtyMarks`: the slot's bitmap, or the
  ring of the vCPU doing the access).
- An access within one page takes the memo: the slot set's `read_views` / `write_views`
  (gfn → a view of the host page). An entry is made only under `host.views_lock` and only
  while no host change is in flight, and every host change empties the memos of every
  set that has entries (`host.register_view_cache`); a slot change publishes a new set
  with empty memos. So the memo never answers differently from the general path — it
  only skips the lookups.
- Only `host` dereferences an hva: a run whose host memory is unmapped or protected fails
  like a faulting `copy_{from,to}_user` at the first inaccessible page.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from . import host
from .args import as_bytes, as_int, check_range, check_span
from .dirty import DirtyRing, running_ring
from .errors import GuestAccessError, KvmError
from .memslots import Memslots
from .slots import MemorySlot, SlotSet
from .uapi import (
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_MASK,
    PAGE_SHIFT,
    U64_MAX,
)

__all__ = ["DirtyMarks", "GuestMemory", "HvaCache", "MarkDirty", "mark_bitmap"]

# mark(slot, first page, count): pages of a logging slot a write touched (slot-relative)
MarkDirty = Callable[[MemorySlot, int, int], None]

_memset = ctypes.memset
_VIEWS_MAX = 4096  # page views remembered per slot set and kind (cleared when full)
_NOT_READABLE = KVM_MEMSLOT_INVALID
_NOT_WRITABLE = KVM_MEMSLOT_INVALID | KVM_MEM_READONLY


def mark_bitmap(slot: MemorySlot, first: int, count: int) -> None:
    """The default `MarkDirty`, and `DirtyMarks`' bitmap branch: the slot's dirty bitmap."""
    bitmap = slot.dirty_bitmap
    if bitmap is not None:
        if count == 1:
            bitmap.mark(first)
        else:
            bitmap.mark_range(first, count)


class DirtyMarks:
    """A VM's mark_page_dirty_in_slot (kvm-semantics §7.1, §7.3): the one place that decides
    where a mark goes. Called as a `MarkDirty`, it marks for the vCPU loaded on this thread
    (`dirty.running_ring`, KVM's kvm_get_running_vcpu); `for_vcpu` gives the `MarkDirty` of
    one vCPU's own accessors (a vCPU's access is made with that vCPU loaded). The rule, in
    KVM's order: a loaded vCPU of another VM → nothing (KVM WARNs); rings on and a vCPU
    loaded → that vCPU's ring, one entry per page, on every call; else the slot's bitmap,
    if it has one — a ring-only VM's logging slots have none, so a mark with no vCPU
    loaded is lost, as on x86 KVM (which WARNs). `dropped` counts the pages lost."""

    __slots__ = ("_memslots", "dropped")

    def __init__(self, memslots: Memslots) -> None:
        self._memslots = memslots
        self.dropped = 0

    def __call__(self, slot: MemorySlot, first: int, count: int) -> None:
        self.mark(slot, first, count, running_ring())

    def mark(self, slot: MemorySlot, first: int, count: int, ring: DirtyRing | None) -> None:
        if ring is not None:
            if ring.owner is not self._memslots:
                self.dropped += count
                return
            if ring.entries:
                ring.push(slot.slot, first, count)
                return
        if slot.dirty_bitmap is not None:
            mark_bitmap(slot, first, count)
        elif self._memslots.dirty_ring_size:
            self.dropped += count

    def for_vcpu(self, ring: DirtyRing) -> MarkDirty:
        def mark(slot: MemorySlot, first: int, count: int) -> None:
            self.mark(slot, first, count, ring)

        return mark


def _hole(slot: MemorySlot | None, gpa: int, done: int, write: bool) -> GuestAccessError:
    if slot is None:
        why = "no memory slot"
    elif slot.flags & KVM_MEMSLOT_INVALID:
        why = f"slot {slot.as_id}:{slot.id} is being deleted or moved"
    else:
        why = f"slot {slot.as_id}:{slot.id} is read-only"
    op = "write to" if write else "read from"
    return GuestAccessError(errno.EFAULT, f"{op} gpa {gpa:#x}: {why} ({done} bytes done)",
                            gpa, done)


def _host_fault(gpa: int, done: int, write: bool) -> GuestAccessError:
    op = "write to" if write else "read from"
    return GuestAccessError(errno.EFAULT, f"{op} gpa {gpa:#x}: host memory behind it is "
                            f"unmapped or protected ({done} bytes done)", gpa, done)


# a run of a dirty-logging slot that a write covers: (slot, hva, length, offset in the write)
_Logged = tuple[MemorySlot, int, int, int]


def _spans(slots: SlotSet, gpa: int, n: int, write: bool
           ) -> tuple[list[tuple[int, int]], list[_Logged], GuestAccessError | None]:
    """[gpa, gpa+n) as host spans (hva, length), stopping at the first hole: the slot runs
    (the longest stretch of the request one slot backs), merged where they continue each
    other in host memory (adjacent slots over one mapping, e.g. the pieces of a split) —
    one copy per span. For a write, also the runs of dirty-logging slots, to mark."""
    spans: list[tuple[int, int]] = []
    logged: list[_Logged] = []
    done = 0
    end = -1  # host address where the last span ends
    bad = _NOT_WRITABLE if write else _NOT_READABLE
    while done < n:
        cur = gpa + done
        if cur > U64_MAX:
            return spans, logged, _hole(None, cur, done, write)
        slot = slots.search(cur >> PAGE_SHIFT)
        if slot is None or slot.flags & bad:
            return spans, logged, _hole(slot, cur, done, write)
        avail = (slot.end_gfn << PAGE_SHIFT) - cur
        length = avail if avail < n - done else n - done
        hva = slot.hva + (cur - (slot.base_gfn << PAGE_SHIFT))
        if hva == end:
            spans[-1] = (spans[-1][0], spans[-1][1] + length)
        else:
            spans.append((hva, length))
        end = hva + length
        if write and slot.dirty_logging:
            logged.append((slot, hva, length, done))
        done += length
    return spans, logged, None


class GuestMemory:
    """Reads, writes and clears of one address space's guest memory (KVM's
    `kvm_read_guest` / `kvm_write_guest` / `kvm_clear_guest`, and the `kvm_vcpu_*` twins)."""

    __slots__ = ("_changing", "_epoch", "_guard", "_root", "_views_lock", "as_id", "mark",
                 "read", "write")

    def __init__(self, memslots: Memslots, as_id: int, mark: MarkDirty = mark_bitmap) -> None:
        self.as_id = as_id
        self.mark = mark
        self._root = memslots.active
        # bound once: the checker builds its VMs after installing its twins in `host`
        self._guard = host.guard
        self._epoch = host.epoch
        self._changing = host.changing
        self._views_lock = host.views_lock
        self._bind_small_paths()

    # -- the section --------------------------------------------------------------------------
    def enter(self) -> list[None]:
        """Begin an accessor section (a read section of the host guard); returns the token
        `leave` takes."""
        return self._guard.read_lock()

    def leave(self, token: list[None]) -> None:
        self._guard.read_unlock(token)

    # -- public accessors --------------------------------------------------------------------
    # The small-access paths inline the guard's read section (`kvmem.sync.Srcu`'s protocol)
    # and use literals for the page geometry (4096): every attribute load shows here.

    read: Callable[[int, int], bytes]
    """Bytes of guest [gpa, gpa+n); a hole raises `GuestAccessError` with `partial` holding
    the bytes read before it."""
    write: Callable[[int, bytes | bytearray | memoryview], None]
    """Write `data` at gpa, marking written pages of logging slots."""

    def _bind_small_paths(self) -> None:
        """`read` and `write`: closures over this accessor's guard, root and address space
        — a cell load is cheaper than an attribute load, and these are the hot paths of
        every small access. Beyond one page, or on a memo miss that cannot be filled, they
        take the general path."""
        guard, root, as_id, mark = self._guard, self._root, self.as_id, self.mark
        fill_read, fill_write = self._fill_read, self._fill_write
        read_runs, write_runs = self._read_runs, self._write_runs

        def read(gpa: int, n: int) -> bytes:
            if gpa.__class__ is int and n.__class__ is int and n >= 0:
                off = gpa & 4095
                end = off + n
                if end <= 4096:
                    r = guard.current
                    r.append(None)
                    try:
                        view = root.value[as_id].read_views.get(gpa >> 12)
                        if view is not None or \
                                (view := fill_read(root.value[as_id], gpa >> 12)) is not None:
                            return bytes(view[off:end])
                    finally:
                        r.pop()
            if gpa.__class__ is not int or n.__class__ is not int or \
                    not 0 <= gpa <= U64_MAX or not 0 <= n <= U64_MAX:
                gpa, n = check_range(gpa, n)
            return read_runs(gpa, n)

        def write(gpa: int, data: bytes | bytearray | memoryview) -> None:
            if gpa.__class__ is int:
                r = guard.current
                r.append(None)
                try:
                    e = root.value[as_id].write_views.get(gpa >> 12)
                    if e is not None or \
                            (e := fill_write(root.value[as_id], gpa >> 12)) is not None:
                        off = gpa & 4095
                        try:
                            end = off + len(data)
                            # one slice store, for flat unsigned-byte data that fits the
                            # page; data past the page end goes to the general path, and
                            # any other (not bytes-like, another format or shape) raises
                            # before a byte is written and goes there too
                            if end <= 4096:
                                e[0][off:end] = data
                                if e[1] is not None and end > off:
                                    mark(e[1], (gpa >> 12) - e[1].base_gfn, 1)
                                return
                        except (TypeError, ValueError):
                            pass
                finally:
                    r.pop()
            if gpa.__class__ is not int or not 0 <= gpa <= U64_MAX:
                gpa, _ = check_range(gpa, 0)
            write_runs(gpa, memoryview(data) if data.__class__ is bytes else
                       as_bytes("data", data))

        self.read = read
        self.write = write

    def clear(self, gpa: int, n: int) -> None:
        """Zero guest [gpa, gpa+n), marking pages dirty. A range past 2^64 is refused
        before any page is zeroed (EINVAL); a hole below it stops the clear with EFAULT."""
        gpa, n = check_span(gpa, n)
        done = 0
        token = self._guard.read_lock()
        try:
            spans, logged, hole = _spans(self._root.value[self.as_id], gpa, n, True)
            for hva, length in spans:
                ok = host.accessible(hva, length, host.PROT_WRITE)
                if ok:
                    _memset(hva, 0, ok)
                done += ok
                if ok != length:
                    hole = _host_fault(gpa + done, done, True)
                    break
            self._mark_written(logged, done)
        finally:
            self._guard.read_unlock(token)
        if hole is not None:
            raise hole

    # -- the memo (caller inside the section) ------------------------------------------------
    def _resolve(self, slots: SlotSet, gfn: int, bad: int, prot: int
                 ) -> tuple[MemorySlot, memoryview] | None:
        """(slot, page view) for a memo entry of `gfn`, or None when none may be made: a
        host change in flight, no usable slot, or host memory not accessible. Caller
        holds `views_lock` (see `host.register_view_cache`)."""
        if self._changing.value:
            return None
        slot = slots.search(gfn)
        if slot is None or slot.flags & bad:
            return None
        view = host.page(slot.hva_of(gfn), prot)
        if view is None:
            return None
        host.register_view_cache(slots)
        return slot, view

    def _fill_read(self, slots: SlotSet, gfn: int) -> memoryview | None:
        with self._views_lock:
            r = self._resolve(slots, gfn, _NOT_READABLE, host.PROT_READ)
            if r is None:
                return None
            memo = slots.read_views
            if len(memo) >= _VIEWS_MAX:
                memo.clear()
            memo[gfn] = r[1]
            return r[1]

    def _fill_write(self, slots: SlotSet, gfn: int
                    ) -> tuple[memoryview, MemorySlot | None] | None:
        with self._views_lock:
            r = self._resolve(slots, gfn, _NOT_WRITABLE, host.PROT_WRITE)
            if r is None:
                return None
            memo = slots.write_views
            if len(memo) >= _VIEWS_MAX:
                memo.clear()
            slot = r[0]
            e = memo[gfn] = (r[1], slot if slot.dirty_logging else None)
            return e

    # -- the general path: slot runs ----------------------------------------------------------
    def _mark_written(self, logged: list[_Logged], done: int) -> None:
        """Mark the pages of logging slots that the first `done` bytes of a write cover."""
        for slot, hva, length, pos in logged:
            if pos >= done:
                break
            length = min(length, done - pos)
            first = (hva - slot.hva) >> PAGE_SHIFT
            last = (hva - slot.hva + length - 1) >> PAGE_SHIFT
            self.mark(slot, first, last - first + 1)

    def _read_runs(self, gpa: int, n: int) -> bytes:
        parts: list[memoryview] = []
        done = 0
        token = self._guard.current  # self._guard.read_lock(), inlined
        token.append(None)
        try:
            spans, _, hole = _spans(self._root.value[self.as_id], gpa, n, False)
            for hva, length in spans:
                segs, ok = host.views(hva, length, host.PROT_READ)
                parts += segs
                if ok != length:
                    hole = _host_fault(gpa + done + ok, done + ok, False)
                    break
                done += length
            out = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        finally:
            token.pop()
        if hole is not None:
            hole.partial = out
            raise hole
        return out

    def _write_runs(self, gpa: int, src: memoryview) -> None:
        n = src.nbytes
        done = 0
        token = self._guard.current  # self._guard.read_lock(), inlined
        token.append(None)
        try:
            spans, logged, hole = _spans(self._root.value[self.as_id], gpa, n, True)
            for hva, length in spans:
                segs, ok = host.views(hva, length, host.PROT_WRITE)
                for seg in segs:
                    k = len(seg)
                    seg[:] = src if k == n else src[done:done + k]
                    done += k
                if ok != length:
                    hole = _host_fault(gpa + done, done, True)
                    break
            if logged:
                self._mark_written(logged, done)
        finally:
            token.pop()
        if hole is not None:
            raise hole


# ------------------------------------------------------------------------------------------
# gfn_to_hva_cache (§3.1)

_HVA_ERR_BAD = -1


class HvaCache:
    """KVM's `gfn_to_hva_cache` over address space 0: remembers gpa → hva for a range and
    re-resolves lazily when the slot generation moves. A range within one page is served
    by a direct copy; a range crossing pages takes the accessor path every time. Host
    mapping changes do not invalidate it (only slot changes do), exactly as in KVM: the
    direct copy goes to whatever the hva maps now. `read`/`write` run inside the accessor
    section: the check of the generation and the copy both happen before a slot update's
    grace period ends, or the copy could use a deleted slot's memory."""

    __slots__ = ("_memory", "_view", "generation", "gpa", "hva", "len", "memslot")

    def __init__(self, memory: GuestMemory, gpa: int, length: int) -> None:
        self._memory = memory
        self.generation = 0
        self.gpa = gpa
        self.len = length
        self.hva = _HVA_ERR_BAD
        self.memslot: MemorySlot | None = None
        # (host epoch, view of the page, writable): a direct copy's page
        self._view: tuple[int, memoryview, bool] | None = None
        token = memory.enter()
        try:
            self._init(gpa, length)
        finally:
            memory.leave(token)

    def _current(self) -> SlotSet:
        return self._memory._root.value[0]

    def _init(self, gpa: int, length: int) -> None:
        slots = self._current()
        # the generation is taken before any check, so a failed init is retried next time
        self.generation = slots.generation
        self.gpa = gpa
        self.len = length
        self.hva = _HVA_ERR_BAD
        self.memslot = None
        self._view = None
        start_gfn = gpa >> PAGE_SHIFT
        end_gfn = (gpa + length - 1) >> PAGE_SHIFT
        if start_gfn > end_gfn:
            raise KvmError(errno.EINVAL, f"hva cache of {length} bytes at gpa {gpa:#x} is empty")
        gfn = start_gfn
        first: MemorySlot | None = None
        while gfn <= end_gfn:
            slot = slots.search(gfn)
            if slot is None or slot.flags & _NOT_WRITABLE:
                raise _hole(slot, gfn << PAGE_SHIFT, (gfn - start_gfn) << PAGE_SHIFT, True)
            if first is None:
                first = slot
            gfn = slot.end_gfn
        assert first is not None
        self.hva = first.hva_of(start_gfn) + (gpa & PAGE_MASK)
        if start_gfn == end_gfn:
            self.memslot = first

    def _revalidate(self, offset: object, n: int) -> tuple[int, MemorySlot | None]:
        """Inside the section: check the range, re-init after a slot change."""
        offset = as_int("offset", offset)
        if offset < 0 or offset + n > self.len:
            raise KvmError(errno.EINVAL, f"offset {offset} + {n} bytes exceeds the cached "
                                         f"{self.len} bytes")
        if self._current().generation != self.generation:
            try:
                self._init(self.gpa, self.len)
            except KvmError as e:
                raise GuestAccessError(errno.EFAULT, f"hva cache re-init failed: {e.message}",
                                       self.gpa + offset, 0) from e
        if self.hva == _HVA_ERR_BAD:
            raise GuestAccessError(errno.EFAULT, "hva cache holds an error translation",
                                   self.gpa + offset, 0)
        return offset, self.memslot

    def _page(self, offset: int, write: bool) -> memoryview:
        """The view of the cached page (inside the section), fetched again after any host
        change; EFAULT where the hva is not accessible now."""
        v = self._view
        if v is not None and v[0] == host.epoch.value and (v[2] or not write):
            return v[1]
        epoch = host.epoch.value
        writable = host.page(self.hva, host.PROT_RW) is not None
        view = host.page(self.hva, host.PROT_WRITE if write else host.PROT_READ)
        if view is None:
            raise _host_fault(self.gpa + offset, 0, write)
        if not host.changing.value:
            self._view = (epoch, view, writable)
        return view

    def read(self, offset: int, n: int) -> bytes:
        memory = self._memory
        if offset.__class__ is int and n.__class__ is int and offset >= 0 and \
                0 <= n <= self.len - offset:
            # a cached page still good: same slot generation, no host change since
            r = memory._guard.current
            r.append(None)
            try:
                v = self._view
                if v is not None and v[0] == memory._epoch.value and self.memslot is not None \
                        and memory._root.value[0].generation == self.generation:
                    start = (self.hva & 4095) + offset
                    return bytes(v[1][start:start + n])
            finally:
                r.pop()
        n = as_int("length", n)
        if n < 0:
            raise KvmError(errno.EINVAL, f"length {n} is negative")
        token = memory.enter()
        try:
            offset, slot = self._revalidate(offset, n)
            if slot is None:
                return memory._read_runs(self.gpa + offset, n)
            start = (self.hva & PAGE_MASK) + offset
            return bytes(self._page(offset, False)[start:start + n])
        finally:
            memory.leave(token)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = as_bytes("data", data)
        n = src.nbytes
        memory = self._memory
        token = memory.enter()
        try:
            offset, slot = self._revalidate(offset, n)
            if slot is None:
                memory._write_runs(self.gpa + offset, src)
                return
            start = (self.hva & PAGE_MASK) + offset
            self._page(offset, True)[start:start + n] = src
            if slot.dirty_logging:
                memory.mark(slot, ((self.gpa + offset) >> PAGE_SHIFT) - slot.base_gfn, 1)
        finally:
            memory.leave(token)
