"""Host memory: mappings at real host virtual addresses, and the events that change them.

Defines:
- `HostMemory` — an mmap'd range (anonymous, memfd or file) whose `hva` is a real address
  of this process, as KVM's `userspace_addr` is. `discard`, `remap` and `protect` change
  what backs a range, and each is reported to every registered notifier as an
  invalidation of that hva range: `invalidate_range_start(start, end)` before the change,
  `invalidate_range_end(start, end)` after it (KVM's MMU notifier, §5).
- `notifiers` — the process-wide notifier list (one mm, as in the kernel: a VM subscribes
  to every mapping, not to particular objects).
- `accessible(hva, n, prot)` — how much of an hva range is mapped by a live `HostMemory`
  with that protection. Accessors copy only what it allows, inside a `guard` read
  section, so an unmapped or protected range fails like a faulting `copy_{from,to}_user`
  (EFAULT) instead of crashing the process.
- `epoch` / `changing` — every change bumps `epoch` when it begins and when it ends, and
  counts itself in `changing` meanwhile. A cache of page views remembers the epoch it was
  filled at, fills only while nothing is changing, and trusts an entry only while the
  epoch is the same: no cached view outlives a change.
- `register_view_cache` / `views_lock` — the same guarantee without an epoch check on
  every use (the accessors' per-slot-set memos): a registered cache is filled only under
  `views_lock` and only while nothing is changing, and every change empties every
  registered cache under `views_lock` once it counts in `changing`. So an entry made
  before a change is gone when the change proceeds, and none is made during one.

Theory: the mapping table is an immutable sorted tuple republished on every change, and
copies run inside a read section of `guard` (an `Srcu`). Unmapping and protecting first
republish the table, then wait for a grace period, then change the real mapping — so no
copy can be in flight on a range that is about to become inaccessible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import weakref
from bisect import bisect_right as _bisect_right
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from . import sync
from .args import as_int
from .errors import KvmError
from .uapi import PAGE_MASK, PAGE_SHIFT

__all__ = [
    "HostMemory",
    "InvalidationListener",
    "ViewCache",
    "accessible",
    "changing",
    "epoch",
    "guard",
    "mappings",
    "notifiers",
    "page",
    "rebuild_shared_state",
    "register_view_cache",
    "restore_shared_state",
    "views_lock",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2

PROT_NONE = mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
PROT_RW = PROT_READ | PROT_WRITE

Kind = Literal["anonymous", "memfd", "file"]



def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class InvalidationListener(Protocol):
    def invalidate_range_start(self, start: int, end: int) -> None: ...
    def invalidate_range_end(self, start: int, end: int) -> None: ...


class _Notifiers:
    """The mm's notifier list: a listener sees every invalidation of any mapping."""

    def __init__(self) -> None:
        self._lock = sync.Mutex("host.notifiers")
        self._listeners: sync.Atomic[tuple[InvalidationListener, ...]] = sync.Atomic(())

    def register(self, listener: InvalidationListener) -> None:
        with self._lock:
            self._listeners.store((*self._listeners.load(), listener))

    def unregister(self, listener: InvalidationListener) -> None:
        with self._lock:
            self._listeners.store(tuple(x for x in self._listeners.load() if x is not listener))

    def start(self, start: int, end: int) -> None:
        for listener in self._listeners.load():
            listener.invalidate_range_start(start, end)

    def end(self, start: int, end: int) -> None:
        for listener in self._listeners.load():
            listener.invalidate_range_end(start, end)


# The module's shared synchronization (`rebuild_shared_state` makes them anew)
notifiers = _Notifiers()
guard = sync.Srcu("host.guard")
# bumped when a change begins and when it ends; `changing` counts changes in flight
epoch: sync.Atomic[int] = sync.Atomic(0)
changing: sync.Atomic[int] = sync.Atomic(0)
# called whenever host pages are replaced (the concurrency checker makes it a point where
# another thread may run: the world changing under kvmem)
page_replaced: Callable[[], None] | None = None


class ViewCache(Protocol):
    """A cache of page views above this layer that every host change empties."""

    def clear_views(self) -> None: ...


# the caches `register_view_cache` was given (while they live) and the lock of their fills
views_lock = sync.Mutex("host.views")
_view_caches: weakref.WeakSet[ViewCache] = weakref.WeakSet()


def register_view_cache(cache: ViewCache) -> None:
    """Have every host change empty `cache` (see `views_lock` in the module notes). Call
    with `views_lock` held, as every fill of the cache must be."""
    views_lock.assert_held()
    _view_caches.add(cache)


def _clear_view_caches() -> None:
    with views_lock:
        for cache in list(_view_caches):
            cache.clear_views()


@contextmanager
def changes_in_flight() -> Iterator[None]:
    """Bracket a change to host mappings (every `HostMemory` change, or one made behind
    its back, such as a VMM's own mmap over guest memory): cached page views are not
    trusted across it."""
    changing.add(1)
    epoch.add(1)
    _clear_view_caches()
    try:
        yield
    finally:
        epoch.add(1)
        changing.add(-1)


@dataclass(frozen=True, slots=True)
class _Region:
    """An accessible run of a mapping: [start, end) with one protection."""

    start: int
    end: int
    prot: int
    owner: HostMemory


# sorted by start, disjoint; republished whole on every change
_table: sync.Atomic[tuple[tuple[int, ...], tuple[_Region, ...]]] = sync.Atomic(((), ()))
_table_lock = sync.Mutex("host.table")

SharedState = tuple[object, ...]


def rebuild_shared_state() -> SharedState:
    """Build the module's shared objects (notifier list, guard, mapping table and its
    lock, epoch counters) anew from the current `kvmem.sync` classes, keeping the mapping
    table's contents; returns the previous ones for `restore_shared_state`. For a
    concurrency checker that swaps `kvmem.sync` for scheduler-aware twins: objects built
    at import are not twins, and a cut-short schedule must not leave its locks held."""
    global notifiers, guard, epoch, changing, _table, _table_lock, views_lock
    saved: SharedState = (notifiers, guard, epoch, changing, _table, _table_lock, views_lock)
    notifiers = _Notifiers()
    guard = sync.Srcu("host.guard")
    epoch = sync.Atomic(epoch.load())
    changing = sync.Atomic(0)
    _table = sync.Atomic(_table.load())
    _table_lock = sync.Mutex("host.table")
    views_lock = sync.Mutex("host.views")
    return saved


def restore_shared_state(saved: SharedState) -> None:
    """Put back what `rebuild_shared_state` replaced; the mapping table keeps what was
    mapped and unmapped meanwhile."""
    global notifiers, guard, epoch, changing, _table, _table_lock, views_lock
    table, moved = _table.load(), epoch.load()
    (notifiers, guard, epoch, changing, _table, _table_lock,
     views_lock) = saved  # type: ignore[assignment]
    _table.store(table)
    epoch.store(max(epoch.load(), moved) + 2)  # no page view cached meanwhile is trusted
    _clear_view_caches()


def _republish(drop: HostMemory | None, add: Iterable[_Region]) -> None:
    _table_lock.assert_held()
    regions = [r for r in _table.load()[1] if r.owner is not drop] + list(add)
    regions.sort(key=lambda r: r.start)
    _table.store((tuple(r.start for r in regions), tuple(regions)))


def mappings() -> list[HostMemory]:
    """Every live mapping with at least one accessible page, in hva order."""
    out: list[HostMemory] = []
    for r in _table.load()[1]:
        if not out or out[-1] is not r.owner:
            out.append(r.owner)
    return out


def accessible(hva: int, n: int, prot: int) -> int:
    """How many bytes from `hva` (up to `n`) are mapped with at least `prot`."""
    starts, regions = _table.load()
    done = 0
    while done < n:
        i = _bisect_right(starts, hva + done) - 1
        if i < 0:
            break
        r = regions[i]
        if hva + done >= r.end or (r.prot & prot) != prot:
            break
        done = min(n, r.end - hva)
    return done


@dataclass(frozen=True, slots=True)
class Frame:
    """The host page behind an hva at one moment (kvmem's pfn): which mapping, which page
    of it, and which incarnation of that page. Two frames are the same page iff equal."""

    owner: HostMemory
    index: int
    incarnation: int
    writable: bool

    @property
    def hva(self) -> int:
        return self.owner.hva + (self.index << PAGE_SHIFT)

    def current(self) -> bool:
        """Still the page the hva maps (no discard/remap/unmap since it was resolved)."""
        owner = self.owner
        return not owner._closed and owner._inc[self.index] == self.incarnation

    def view(self, npages: int = 1) -> memoryview:
        """A memoryview over this page (and the `npages - 1` after it) of the mapping."""
        return self.owner.page_view(self.index, npages)


def resolve(hva: int, write: bool) -> Frame | None:
    """hva_to_pfn: the frame behind the page of `hva`, or None if it cannot be had with the
    access wanted (unmapped, PROT_NONE, or read-only for a write). A read of a writable
    page reports `writable` so the caller may map it writable (KVM's map_writable)."""
    starts, regions = _table.value
    i = _bisect_right(starts, hva) - 1
    if i < 0:
        return None
    r = regions[i]
    if hva >= r.end or not r.prot & PROT_READ or (write and not r.prot & PROT_WRITE):
        return None
    owner = r.owner
    index = (hva - owner.hva) >> PAGE_SHIFT
    return Frame(owner, index, owner._inc[index], bool(r.prot & PROT_WRITE))


def page(hva: int, prot: int) -> memoryview | None:
    """A memoryview over the whole host page of `hva` if it is mapped with at least
    `prot`, else None. Use it inside a `guard` read section, or while something else
    guarantees the page stays accessible (see `epoch`)."""
    starts, regions = _table.value
    i = _bisect_right(starts, hva) - 1
    if i < 0:
        return None
    r = regions[i]
    if hva >= r.end or r.prot & prot != prot:
        return None
    off = (hva - r.owner.hva) & ~PAGE_MASK
    return r.owner._mv[off:off + (1 << PAGE_SHIFT)]


def views(hva: int, n: int, prot: int) -> tuple[list[memoryview], int]:
    """Memoryviews over the host pages of [hva, hva+n) that allow `prot`, in order, and how
    many bytes they cover (less than `n` where the range stops being accessible). Call
    inside a `guard` read section and finish copying before leaving it."""
    starts, regions = _table.value
    i = _bisect_right(starts, hva) - 1
    if i >= 0:  # the common case: one region covers it all
        r = regions[i]
        if hva + n <= r.end and r.prot & prot == prot:
            off = hva - r.owner.hva
            return [r.owner._mv[off:off + n]], n
    out: list[memoryview] = []
    done = 0
    while done < n:
        cur = hva + done
        i = _bisect_right(starts, cur) - 1
        if i < 0:
            break
        r = regions[i]
        if cur >= r.end or (r.prot & prot) != prot:
            break
        take = min(n - done, r.end - cur)
        off = cur - r.owner.hva
        out.append(r.owner._mv[off:off + take])
        done += take
    return out, done


class HostMemory:
    """A host mapping at a real hva. Create with `anonymous`, `memfd` or `file`."""

    def __init__(self, kind: Kind, size: int, fd: int | None, path: str | None) -> None:
        self._check_size(size)
        self.kind: Kind = kind
        self.size = size
        self.fd = fd
        self.path = path
        self._lock = sync.Mutex("HostMemory")
        self._closed = False
        addr = _mmap(None, size, PROT_RW, self._map_flags(), -1 if fd is None else fd, 0)
        if addr in (None, _MAP_FAILED):
            raise _oserror("mmap")
        self.hva: int = addr
        self._mv = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        # which host page backs each page now: bumped when discard/remap/close replace it
        # (np.zeros is calloc: untouched entries of a huge mapping cost nothing)
        self._frames = np.zeros(size >> PAGE_SHIFT, dtype=np.uint32)
        self._inc = memoryview(self._frames.data)  # scalar reads without a NumPy scalar
        # per-page protection, as runs: [(start_offset, end_offset, prot)]
        self._prot: list[tuple[int, int, int]] = [(0, size, PROT_RW)]
        with _table_lock:
            _republish(None, self._regions())

    @staticmethod
    def _check_size(size: object) -> None:
        size = as_int("size", size)
        # below 2^63: the size of a memfd or file is an off_t (ftruncate) as well as a size_t
        if size <= 0 or size & PAGE_MASK or size >> 63:
            raise KvmError(errno.EINVAL, f"size {size:#x} must be a positive multiple of 4096 "
                                         "below 2^63")

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def anonymous(cls, size: int) -> HostMemory:
        """Private anonymous memory (MAP_NORESERVE: pages are allocated on first touch)."""
        return cls("anonymous", size, None, None)

    @classmethod
    def memfd(cls, size: int, name: str = "kvmem") -> HostMemory:
        """Shared memory backed by a memfd."""
        cls._check_size(size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls("memfd", size, fd, None)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def file(cls, path: str | os.PathLike[str], size: int) -> HostMemory:
        """Shared mapping of a file, extended to `size` if shorter."""
        cls._check_size(size)
        p = os.fspath(path)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            return cls("file", size, fd, p)
        except BaseException:
            os.close(fd)
            raise

    def _map_flags(self) -> int:
        if self.fd is None:
            return mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        return mmap.MAP_SHARED

    def _regions(self) -> list[_Region]:
        return [
            _Region(self.hva + s, self.hva + e, p, self) for s, e, p in self._prot if p != PROT_NONE
        ]

    # -- views ----------------------------------------------------------------------------
    def view(self) -> memoryview:
        """A writable memoryview over the whole mapping (host access: never dirty-logged)."""
        self._check_open()
        return self._mv

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"hva={self.hva:#x}"
        return f"HostMemory({self.kind}, size={self.size:#x}, {state})"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- pages (kvmem's pfns) -------------------------------------------------------------
    def incarnation(self, index: int) -> int:
        """Which host page backs page `index` now: it changes whenever discard, remap or
        close replace the page."""
        return self._inc[index]

    def incarnations(self, index: int, npages: int) -> bytes:
        """The incarnations of pages [index, index + npages), 4 bytes each."""
        return self._frames[index:index + npages].tobytes()

    def page_view(self, index: int, npages: int = 1) -> memoryview:
        """A memoryview over pages [index, index + npages). Use it only while something
        guarantees the pages stay mapped (a read section of `guard`, or the stage-2
        protocol that zaps and flushes before every change)."""
        off = index << PAGE_SHIFT
        return self._mv[off:off + (npages << PAGE_SHIFT)]

    # -- changes, each an invalidation ----------------------------------------------------
    def _check_range(self, offset: object, length: object) -> None:
        offset, length = as_int("offset", offset), as_int("length", length)
        self._check_open()
        if offset < 0 or length <= 0 or offset & PAGE_MASK or length & PAGE_MASK:
            raise KvmError(errno.EINVAL, f"range {offset:#x}+{length:#x} must be page-aligned")
        if offset + length > self.size:
            raise KvmError(errno.EINVAL,
                           f"range {offset:#x}+{length:#x} beyond size {self.size:#x}")

    def _check_open(self) -> None:
        if self._closed:
            raise KvmError(errno.EBADF, "host memory is closed")

    def _change(self, offset: int, length: int, action: Callable[[], None]) -> None:
        self._check_range(offset, length)
        start, end = self.hva + offset, self.hva + offset + length
        with self._lock, changes_in_flight():
            notifiers.start(start, end)
            try:
                action()
            finally:
                notifiers.end(start, end)

    def discard(self, offset: int, length: int) -> None:
        """Drop the pages (MADV_DONTNEED; hole punch for memfd/file): they read as zero."""

        def act() -> None:
            addr = self.hva + offset
            punch = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if self.fd is not None and _fallocate(self.fd, punch, offset, length) != 0:
                raise _oserror("fallocate")
            if _madvise(addr, length, _MADV_DONTNEED) != 0:
                raise _oserror("madvise")
            self._new_frames(offset, length)

        self._change(offset, length, act)

    def remap(self, offset: int, length: int) -> None:
        """Map the range anew in place (mmap MAP_FIXED): anonymous memory gets fresh zero
        pages; memfd/file memory is mapped again from the same file offset."""

        def act() -> None:
            self._set_prot(offset, length, PROT_NONE)  # readers keep off while it is replaced
            fd = -1 if self.fd is None else self.fd
            addr = _mmap(self.hva + offset, length, PROT_RW, self._map_flags() | _MAP_FIXED,
                         fd, 0 if self.fd is None else offset)
            if addr in (None, _MAP_FAILED):
                raise _oserror("mmap")
            self._new_frames(offset, length)
            self._set_prot(offset, length, PROT_RW)

        self._change(offset, length, act)

    def protect(self, offset: int, length: int, prot: int) -> None:
        """mprotect the range: PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE."""
        prot = as_int("prot", prot)
        if prot not in (PROT_NONE, PROT_READ, PROT_RW):
            raise KvmError(errno.EINVAL, f"prot {prot} must be PROT_NONE, PROT_READ or PROT_RW")

        def act() -> None:
            # copies keep off the range while the real protection changes: neither the old
            # nor the new protection may be assumed until mprotect has returned
            self._set_prot(offset, length, PROT_NONE)
            if _mprotect(self.hva + offset, length, prot) != 0:
                raise _oserror("mprotect")
            self._set_prot(offset, length, prot)

        self._change(offset, length, act)

    def protection(self, offset: int) -> int:
        """The protection of the page at `offset`."""
        offset = as_int("offset", offset)
        for s, e, p in self._prot:
            if s <= offset < e:
                return p
        raise KvmError(errno.EINVAL, f"offset {offset:#x} beyond size {self.size:#x}")

    def _set_prot(self, offset: int, length: int, prot: int) -> None:
        end = offset + length
        runs: list[tuple[int, int, int]] = []
        for s, e, p in self._prot:
            if s < offset:
                runs.append((s, min(e, offset), p))
            if e > end:
                runs.append((max(s, end), e, p))
        runs.append((offset, end, prot))
        runs.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, p in runs:
            if merged and merged[-1][1] == s and merged[-1][2] == p:
                merged[-1] = (merged[-1][0], e, p)
            else:
                merged.append((s, e, p))
        self._prot = merged
        with _table_lock:
            _republish(self, self._regions())
        guard.synchronize()

    def _new_frames(self, offset: int, length: int) -> None:
        if page_replaced is not None:
            page_replaced()
        self._frames[offset >> PAGE_SHIFT:(offset + length) >> PAGE_SHIFT] += 1

    def close(self) -> None:
        """Unmap (an invalidation of the whole range) and close the file descriptor."""
        if self._closed:
            return
        with self._lock, changes_in_flight():
            start, end = self.hva, self.hva + self.size
            notifiers.start(start, end)
            try:
                self._unmap()
            finally:
                notifiers.end(start, end)

    def _unmap(self) -> None:
        with _table_lock:
            _republish(self, ())
        guard.synchronize()
        self._closed = True
        self._new_frames(0, self.size)
        if _munmap(self.hva, self.size) != 0:
            raise _oserror("munmap")
        if self.fd is not None:
            os.close(self.fd)

    def force_close(self) -> None:
        """Unmap without telling anyone and without a grace period: for a concurrency
        checker whose schedule was cut short with locks held and readers stranded. Never
        use it on memory anything may still touch."""
        if not self._closed:
            with _table_lock:
                _republish(self, ())
            self._closed = True
            _munmap(self.hva, self.size)
            if self.fd is not None:
                os.close(self.fd)

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

