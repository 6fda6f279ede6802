"""Guest memory accessors (kvm-semantics §3): read / write / clear by gpa, and the hva cache.

Rules of this room:
- Every function takes the `SlotSet` it resolves against and a `lookup` (the VM-wide or a
  vCPU's last-used-slot lookup); the caller chooses the address space and holds the
  SRCU read section. Nothing here knows about vCPUs, transactions or engines.
- KVM walks page by page; we walk *slot runs*: the longest stretch of the request that one
  slot backs, copied with one memmove. The observable result is KVM's: the first page that
  fails stops the access with EFAULT, earlier pages stay written, and written pages of
  dirty-logging slots are marked.
- Only `host` dereferences an hva; a run whose host memory is unmapped or protected fails
  like a faulting `copy_{from,to}_user` at the first inaccessible page.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from . import host, sync
from .errors import GuestAccessError, KvmError
from .slots import MemorySlot, SlotSet
from .uapi import (
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_MASK,
    PAGE_SHIFT,
    U64_MAX,
)

__all__ = ["HvaCache", "byte_view", "check_range", "clear", "read", "write"]

Lookup = Callable[[int], MemorySlot | None]

_memset = ctypes.memset


def check_range(gpa: object, n: object) -> tuple[int, int]:
    """API-boundary checks for a (gpa, length) pair."""
    if not isinstance(gpa, int) or isinstance(gpa, bool):
        raise TypeError(f"gpa must be an int, not {type(gpa).__name__}")
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"length must be an int, not {type(n).__name__}")
    if gpa < 0 or gpa > U64_MAX:
        raise KvmError(errno.EINVAL, f"gpa {gpa:#x} is not a 64-bit guest physical address")
    if n < 0:
        raise KvmError(errno.EINVAL, f"length {n} is negative")
    return gpa, n


def byte_view(data: object) -> memoryview:
    """Any bytes-like object as a flat, C-contiguous memoryview of bytes."""
    if isinstance(data, bytes | bytearray):
        return memoryview(data)
    if not isinstance(data, memoryview):
        try:
            data = memoryview(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    if not data.c_contiguous:
        return memoryview(data.tobytes())
    return data if data.format == "B" and data.ndim == 1 else data.cast("B")


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


def _runs(lookup: Lookup, gpa: int, n: int, write: bool
          ) -> tuple[list[tuple[MemorySlot, int, int]], GuestAccessError | None]:
    """Split [gpa, gpa+n) into (slot, hva, length) runs, stopping at the first hole."""
    runs: list[tuple[MemorySlot, int, int]] = []
    done = 0
    bad = KVM_MEMSLOT_INVALID | (KVM_MEM_READONLY if write else 0)
    while done < n:
        cur = gpa + done
        if cur > U64_MAX:
            return runs, _hole(None, cur, done, write)
        slot = lookup(cur >> PAGE_SHIFT)
        if slot is None or slot.flags & bad:
            return runs, _hole(slot, cur, done, write)
        avail = (slot.end_gfn << PAGE_SHIFT) - cur
        length = avail if avail < n - done else n - done
        runs.append((slot, slot.hva + (cur - (slot.base_gfn << PAGE_SHIFT)), length))
        done += length
    return runs, None


def _mark_dirty(slot: MemorySlot, hva: int, length: int) -> None:
    bitmap = slot.dirty_bitmap
    if bitmap is not None:
        first = (hva - slot.hva) >> PAGE_SHIFT
        last = (hva - slot.hva + length - 1) >> PAGE_SHIFT
        if first == last:
            bitmap.mark(first)
        else:
            bitmap.mark_range(first, last - first + 1)


def _host_fault(gpa: int, done: int, write: bool) -> GuestAccessError:
    op = "write to" if write else "read from"
    return GuestAccessError(errno.EFAULT, f"{op} gpa {gpa:#x}: host memory behind it is "
                            f"unmapped or protected ({done} bytes done)", gpa, done)


def _spans(runs: list[tuple[MemorySlot, int, int]]) -> list[tuple[int, int]]:
    """Slot runs merged where they continue each other in host memory (adjacent slots over
    one mapping, e.g. the pieces of a split): one copy per span."""
    spans: list[tuple[int, int]] = []
    for _slot, hva, length in runs:
        if spans and spans[-1][0] + spans[-1][1] == hva:
            spans[-1] = (spans[-1][0], spans[-1][1] + length)
        else:
            spans.append((hva, length))
    return spans


def read(lookup: Lookup, gpa: int, n: int) -> bytes:
    """`kvm_read_guest`: bytes of guest [gpa, gpa+n); a hole raises `GuestAccessError`
    with `partial` holding the bytes read before it."""
    runs, hole = _runs(lookup, gpa, n, False)
    parts: list[memoryview] = []
    done = 0
    host.guard.read_lock()
    try:
        for hva, length in _spans(runs):
            segs, ok = host.views(hva, length, host.PROT_READ)
            parts += segs
            if ok != length:
                hole = _host_fault(gpa + done + ok, done + ok, False)
                break
            done += length
        out = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
    finally:
        host.guard.read_unlock()
    if hole is not None:
        hole.partial = out
        raise hole
    return out


def write(lookup: Lookup, gpa: int, src: memoryview) -> None:
    """`kvm_write_guest`: write `src` (a `byte_view`) at gpa, marking written pages of
    logging slots."""
    n = src.nbytes
    runs, hole = _runs(lookup, gpa, n, True)
    done = 0
    host.guard.read_lock()
    try:
        for hva, length in _spans(runs):
            segs, ok = host.views(hva, length, host.PROT_WRITE)
            for seg in segs:
                k = len(seg)
                seg[:] = src[done:done + k]
                done += k
            if ok != length:
                hole = _host_fault(gpa + done, done, True)
                break
    finally:
        host.guard.read_unlock()
    pos = 0
    for slot, hva, length in runs:
        if pos >= done:
            break
        if slot.dirty_bitmap is not None:
            _mark_dirty(slot, hva, min(length, done - pos))
        pos += length
    if hole is not None:
        raise hole


def clear(lookup: Lookup, gpa: int, n: int) -> None:
    """`kvm_clear_guest`: zero guest [gpa, gpa+n), marking pages dirty."""
    runs, hole = _runs(lookup, gpa, n, True)
    done = 0
    host.guard.read_lock()
    try:
        for slot, hva, length in runs:
            ok = host.accessible(hva, length, host.PROT_WRITE)
            if ok:
                _memset(hva, 0, ok)
                _mark_dirty(slot, hva, ok)
            if ok != length:
                raise _host_fault(gpa + done + ok, done + ok, True)
            done += length
    finally:
        host.guard.read_unlock()
    if hole is not None:
        raise hole


# ------------------------------------------------------------------------------------------
# gfn_to_hva_cache (§3.1)

_HVA_ERR_BAD = -1


class HvaCache:
    """KVM's `gfn_to_hva_cache` over address space 0: remembers gpa → hva for a range and
    re-resolves lazily when the slot generation moves. A range within one page is served
    by a direct copy; a range crossing pages takes the accessor (slow) path every time.
    Host mapping changes do not invalidate it (only slot changes do), exactly as in KVM.
    `read`/`write` run inside a read section of `srcu` (the VM's), as KVM's callers hold
    kvm->srcu: the check of the generation and the copy must both happen before a slot
    update's grace period ends, or the copy may use a deleted slot's memory."""

    __slots__ = ("_current", "_srcu", "generation", "gpa", "hva", "len", "memslot")

    def __init__(self, current: Callable[[], SlotSet], gpa: int, length: int,
                 srcu: sync.Srcu | None = None) -> None:
        self._current = current
        self._srcu = srcu
        self.generation = 0
        self.gpa = gpa
        self.len = length
        self.hva = _HVA_ERR_BAD
        self.memslot: MemorySlot | None = None
        self._init(gpa, length)

    def _init(self, gpa: int, length: int) -> None:
        slots = self._current()
        # the generation is taken before any check, so a failed init is retried next time
        self.generation = slots.generation
        self.gpa = gpa
        self.len = length
        self.hva = _HVA_ERR_BAD
        self.memslot = None
        start_gfn = gpa >> PAGE_SHIFT
        end_gfn = (gpa + length - 1) >> PAGE_SHIFT
        if start_gfn > end_gfn:
            raise KvmError(errno.EINVAL, f"hva cache of {length} bytes at gpa {gpa:#x} is empty")
        gfn = start_gfn
        first: MemorySlot | None = None
        while gfn <= end_gfn:
            slot = slots.lookup(gfn)
            if slot is None or slot.flags & (KVM_MEMSLOT_INVALID | KVM_MEM_READONLY):
                raise _hole(slot, gfn << PAGE_SHIFT, (gfn - start_gfn) << PAGE_SHIFT, True)
            if first is None:
                first = slot
            gfn = slot.end_gfn
        assert first is not None
        self.hva = first.hva_of(start_gfn) + (gpa & PAGE_MASK)
        if start_gfn == end_gfn:
            self.memslot = first

    def _revalidate(self, offset: int, n: int) -> MemorySlot | None:
        if offset < 0 or n < 0 or offset + n > self.len:
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
        return self.memslot

    def read(self, offset: int, n: int) -> bytes:
        srcu = self._srcu
        if srcu is None:
            return self._read(offset, n)
        srcu.read_lock()
        try:
            return self._read(offset, n)
        finally:
            srcu.read_unlock()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        srcu = self._srcu
        if srcu is None:
            self._write(offset, data)
            return
        srcu.read_lock()
        try:
            self._write(offset, data)
        finally:
            srcu.read_unlock()

    def _read(self, offset: int, n: int) -> bytes:
        slot = self._revalidate(offset, n)
        if slot is None:
            return read(self._current().lookup, self.gpa + offset, n)
        host.guard.read_lock()
        try:
            segs, ok = host.views(self.hva + offset, n, host.PROT_READ)
            if ok != n:
                raise _host_fault(self.gpa + offset, 0, False)
            return bytes(segs[0]) if len(segs) == 1 else b"".join(segs)
        finally:
            host.guard.read_unlock()

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = byte_view(data)
        n = src.nbytes
        slot = self._revalidate(offset, n)
        if slot is None:
            write(self._current().lookup, self.gpa + offset, src)
            return
        host.guard.read_lock()
        try:
            segs, ok = host.views(self.hva + offset, n, host.PROT_WRITE)
            if ok != n:
                raise _host_fault(self.gpa + offset, 0, True)
            pos = 0
            for seg in segs:
                seg[:] = src[pos:pos + len(seg)]
                pos += len(seg)
        finally:
            host.guard.read_unlock()
        bitmap = slot.dirty_bitmap
        if bitmap is not None:
            bitmap.mark(((self.gpa + offset) >> PAGE_SHIFT) - slot.base_gfn)



