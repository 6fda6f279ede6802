"""guest_memfd files: what KVM_CREATE_GUEST_MEMFD makes, and their bindings to memory slots.

Defines:
- `GuestMemfd` — kvmem's model of one guest_memfd file (kvm-semantics §8.2-§8.5): created with
  KVM's checks (`create`), changed with fallocate's (`punch_hole`, `allocate`), mapped into the
  host (`mmap`), bound to slots (`bind`, `unbind`, `bindings_in`; a VM's update path checks
  a batch with `check_bind` and makes it with `rebind`), read by kvmem's own fault
  path without an hva (`get_pfn`, `page_view`: the kernel's direct map), released by `close`.
- `GmemFrame` — one page of a file at one moment (the gmem twin of `host.Frame`): it stops
  being `current()` when the page is punched or the file released.
- `GmemMapping` — a host mapping of a file (a `HostMemory`): always MAP_SHARED, whole file.
- `GmemInvalidator` — the Protocol the MMU implements to hear about invalidations that have
  no hva (hole punching, release); `GmemSlot` — what a binding needs to know of a slot.
- `Binding`, `GfnRange`, `SlotRef`, `supported_flags`, the `GUEST_MEMFD_FLAG_*` bits.

Rules of this room:
- Every refusal is KVM's (or the VFS's, or mm's) for the same call, checked in the kernel's
  order, as a `KvmError` with its errno; a refused call changes nothing. The check orders are
  tables (`_CREATE_RULES`, `_FALLOCATE_RULES`, ...) read top to bottom.
- KVM's own arithmetic is kept where it is odd: `bind` compares the end of a binding as an
  loff_t sum, which wraps past 2^63 and then accepts a binding past the end of the file
  (measured on this host, and tested against it).
- 64-bit arguments (size, flags, offset, length) are taken as the kernel takes them: any int
  whose bit pattern fits 64 bits (-2^63 <= v < 2^64) is that pattern, read as signed where the
  kernel's type is `loff_t` — so 2^64 - 4096 and -4096 are the same request. Other ints are a
  `ValueError`, non-ints (bools included) a `TypeError`.
- This file knows nothing of slot sets, the MMU or engines: it sees a slot only through
  `GmemSlot` and tells the VM about invalidations only through `GmemInvalidator`.
- Lock order (§8.4): slots_lock (the VM's) -> `invalidate_lock` -> the MMU's lock. The file's
  `invalidate_lock` is held exclusive by bind, unbind, rebind, punch and release, shared by
  allocate and mmap; `get_pfn` takes no lock (the MMU's sequence count covers its races, §5).

Theory of operation. A file is backed by a memfd kvmem creates (same size, holes read as
zero), or by a file descriptor handed in (the KVM engine hands in a real guest_memfd). Page
contents live only there; kvmem reaches them through the *direct map*: its own MAP_SHARED
windows of the backing file, mapped on first use, which no hva table knows of (a handed-in
file is reachable so only with MMAP | INIT_SHARED; otherwise its pages are the kernel's). A page's
identity is its index plus an incarnation number, kept as runs over the index space (a punch
of any size is one run), so a stage-2 mapping built on a page can tell it was punched since.
Bindings are an immutable table, republished whole under the exclusive lock, so lookups
never lock. A punch runs KVM's bracket: invalidate begin -> per intersecting binding, the gfn
range added and zapped -> the pages replaced (incarnations first, then the host mappings'
own hva bracket, then the backing file) -> invalidate end; with no intersecting binding no
begin and no end. The file lives while its fd or any mapping does; the last one releases it.

Host access to pages of a file without GUEST_MEMFD_FLAG_INIT_SHARED raises SIGBUS in the
kernel. kvmem keeps such a mapping PROT_NONE in the hva table, so its accessors get EFAULT
(what a kernel copy_from_user gets there), `GmemMapping.view()` and `page_view()` raise
EFAULT, and raising the protection or remapping it is refused with EACCES — kvmem's one
deliberate departure, made so the process never takes the signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap as _mmap_module
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from . import sync
from .errors import KvmError
from .host import PROT_NONE, HostMemory
from .uapi import PAGE_MASK, PAGE_SHIFT

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "MAX_LFS_FILESIZE",
    "Binding",
    "GfnRange",
    "GmemFrame",
    "GmemInvalidator",
    "GmemMapping",
    "GmemSlot",
    "GuestMemfd",
    "SlotRef",
    "supported_flags",
]

GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1
# s_maxbytes of the pseudo file system guest_memfd inodes live on: fallocate's EFBIG bound
MAX_LFS_FILESIZE: Final = (1 << 63) - 1

_U64_MASK: Final = (1 << 64) - 1
_S64_MIN: Final = -(1 << 63)
_INDEX_END: Final = 1 << 64  # release invalidates page indices [0, ULONG_MAX]
_DIRECT_CHUNK: Final = 1 << 30  # one direct-map window
_FALLOC_FL_KEEP_SIZE: Final = 1
_FALLOC_FL_PUNCH_HOLE: Final = 2

# private primitives (host.py's ctypes wrappers are its own): fallocate, and an address-space
# reservation that tells whether a mapping of some length could be placed at all
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_MAP_NORESERVE: Final = 0x4000


def supported_flags(private_memory: bool) -> int:
    """KVM_CAP_GUEST_MEMFD_FLAGS: INIT_SHARED only where no memory can be private."""
    return GUEST_MEMFD_FLAG_MMAP | (0 if private_memory else GUEST_MEMFD_FLAG_INIT_SHARED)


# -- arguments ------------------------------------------------------------------------------------
def _int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _word(name: str, value: object) -> int:
    """The 64-bit pattern of an argument (see the module's rules)."""
    v = _int(name, value)
    if not _S64_MIN <= v <= _U64_MASK:
        raise ValueError(f"{name}={v:#x} does not fit 64 bits")
    return v & _U64_MASK


def _signed(word: int) -> int:
    return word - (1 << 64) if word >> 63 else word


def _loff(name: str, value: object) -> int:
    """An `loff_t` argument: the pattern read as signed."""
    return _signed(_word(name, value))


# -- check tables: (refuses, errno, message), applied in order ------------------------------------
A = TypeVar("A")
_Rules = tuple[tuple[Callable[[A], bool], int, Callable[[A], str]], ...]


def _check(rules: _Rules[A], args: A) -> None:
    for refuses, err, message in rules:
        if refuses(args):
            raise KvmError(err, message(args))


@dataclass(frozen=True, slots=True)
class _Create:
    size: int  # as signed
    flags: int
    supported: int


_CREATE_RULES: _Rules[_Create] = (
    (lambda a: bool(a.flags & ~a.supported), errno.EINVAL,
     lambda a: f"KVM_CREATE_GUEST_MEMFD: flags {a.flags:#x} outside the supported "
               f"{a.supported:#x}"),
    (lambda a: a.size <= 0, errno.EINVAL,
     lambda a: f"KVM_CREATE_GUEST_MEMFD: size {a.size:#x} is not positive as a signed "
               f"64-bit number"),
    (lambda a: bool(a.size & PAGE_MASK), errno.EINVAL,
     lambda a: f"KVM_CREATE_GUEST_MEMFD: size {a.size:#x} is not a multiple of 4096"),
)


@dataclass(frozen=True, slots=True)
class _Falloc:
    offset: int  # as signed
    length: int  # as signed
    size: int


# vfs_fallocate, then kvm_gmem_fallocate (the mode is fixed by the call, so its checks pass)
_FALLOCATE_RULES: _Rules[_Falloc] = (
    (lambda a: a.offset < 0 or a.length <= 0, errno.EINVAL,
     lambda a: f"fallocate: offset {a.offset:#x} must be >= 0 and length {a.length:#x} > 0"),
    (lambda a: a.offset + a.length > MAX_LFS_FILESIZE, errno.EFBIG,
     lambda a: f"fallocate: offset {a.offset:#x} + length {a.length:#x} passes the largest "
               f"file offset {MAX_LFS_FILESIZE:#x}"),
    (lambda a: bool((a.offset | a.length) & PAGE_MASK), errno.EINVAL,
     lambda a: f"fallocate: offset {a.offset:#x} and length {a.length:#x} must be multiples "
               f"of 4096"),
)
# kvm_gmem_allocate: the size is immutable, so allocation stops at it (punching does not)
_ALLOCATE_RULES: _Rules[_Falloc] = (
    (lambda a: a.offset + a.length > a.size, errno.EINVAL,
     lambda a: f"fallocate: [{a.offset:#x}, {a.offset + a.length:#x}) passes the end of the "
               f"file ({a.size:#x}); a guest_memfd cannot grow"),
)


@dataclass(frozen=True, slots=True)
class _Bind:
    offset: int  # as signed
    npages: int
    size: int
    owner_ok: bool


def _wrapped_end(a: _Bind) -> int:
    # KVM compares offset + slot size as loff_t: past 2^63 the sum wraps negative and passes
    # (measured here: a 2-page slot at offset 2^63 - 4096 of a 1 MiB file is accepted)
    return _signed((a.offset + (a.npages << PAGE_SHIFT)) & _U64_MASK)


# kvm_gmem_bind after fget (EBADF is the caller's fd check): steps 18b-18d of §8.3
_BIND_RULES: _Rules[_Bind] = (
    (lambda a: not a.owner_ok, errno.EINVAL,
     lambda a: "guest_memfd belongs to another VM"),
    (lambda a: a.offset < 0, errno.EINVAL,
     lambda a: f"guest_memfd_offset {a.offset & _U64_MASK:#x} is negative as a signed "
               f"64-bit number"),
    (lambda a: bool(a.offset & PAGE_MASK), errno.EINVAL,
     lambda a: f"guest_memfd_offset {a.offset:#x} is not a multiple of 4096"),
    (lambda a: _wrapped_end(a) > a.size, errno.EINVAL,
     lambda a: f"guest_memfd_offset {a.offset:#x} + {a.npages} pages passes the end of the "
               f"file ({a.size:#x})"),
)


# -- slots, bindings, invalidation --------------------------------------------------------------
class GmemSlot(Protocol):
    """What a binding needs of a memory slot (`slots.MemorySlot` has it)."""

    @property
    def as_id(self) -> int: ...
    @property
    def id(self) -> int: ...
    @property
    def base_gfn(self) -> int: ...
    @property
    def npages(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SlotRef:
    """A plain `GmemSlot`, for callers that have no slot object."""

    as_id: int
    id: int
    base_gfn: int
    npages: int


class GmemInvalidator(Protocol):
    """The VM's side of an invalidation without an hva (§8.5); the MMU implements it.

    Called with the file's `invalidate_lock` held exclusive, so the bindings behind one
    bracket do not change. For one punch or release: `gmem_invalidate_begin()` once (before
    the first range), `gmem_invalidate_range(as_id, start, end)` once per intersecting binding,
    then the pages change, then `gmem_invalidate_end()` once. Nothing is called when no binding
    intersects. Each call takes and drops the MMU's own lock."""

    def gmem_invalidate_begin(self) -> None:
        """kvm_mmu_invalidate_begin: in_progress += 1 (faults in the range retry from now)."""

    def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
        """kvm_mmu_unmap_gfn_range: add [gfn_start, gfn_end) of `as_id` to the in-progress
        range and zap its stage-2 mappings; return only once no vCPU can still use one (the
        TLB flush), because the pages are freed right after the last range."""

    def gmem_invalidate_end(self) -> None:
        """kvm_mmu_invalidate_end: seq += 1, in_progress -= 1."""


@dataclass(frozen=True, slots=True)
class GfnRange:
    """The gfns of one binding that an invalidation covers: [start, end) of `as_id`."""

    as_id: int
    start: int
    end: int
    slot: GmemSlot


@dataclass(frozen=True, slots=True, eq=False)
class Binding:
    """Pages [pgoff, pgoff + npages) of a file back gfns [base_gfn, base_gfn + npages) of
    `slot`: index(gfn) = gfn - base_gfn + pgoff."""

    slot: GmemSlot
    pgoff: int
    npages: int

    @property
    def end(self) -> int:
        return self.pgoff + self.npages

    def index_of(self, gfn: int) -> int:
        return gfn - self.slot.base_gfn + self.pgoff

    def gfns(self, start: int, end: int) -> GfnRange:
        """The gfns of pages [start, end) ∩ this binding (KVM's formula)."""
        base = self.slot.base_gfn
        return GfnRange(self.slot.as_id, base + max(self.pgoff, start) - self.pgoff,
                        base + min(self.end, end) - self.pgoff, self.slot)


def _key(slot: GmemSlot) -> tuple[int, int]:
    return (slot.as_id, slot.id)


class _Bindings:
    """An immutable, sorted, disjoint set of bindings (KVM's per-file xarray)."""

    __slots__ = ("by_key", "items", "starts")

    def __init__(self, items: Sequence[Binding]) -> None:
        self.items = tuple(sorted(items, key=lambda b: b.pgoff))
        self.starts = tuple(b.pgoff for b in self.items)
        self.by_key = {_key(b.slot): b for b in self.items}

    def at(self, index: int) -> Binding | None:
        i = bisect_right(self.starts, index) - 1
        if i >= 0 and index < self.items[i].end:
            return self.items[i]
        return None

    def intersecting(self, start: int, end: int) -> list[Binding]:
        i = max(bisect_right(self.starts, start) - 1, 0)
        out = []
        for b in self.items[i:]:
            if b.pgoff >= end:
                break
            if b.end > start:
                out.append(b)
        return out


_NO_BINDINGS: Final = _Bindings(())


def _planned(table: _Bindings, leaving: Sequence[GmemSlot],
             coming: Sequence[tuple[GmemSlot, int]]) -> _Bindings:
    """`table` without the bindings of `leaving` and with those of `coming`."""
    if not leaving and not coming:
        return table
    gone = {_key(s) for s in leaving}
    return _Bindings([b for b in table.items if _key(b.slot) not in gone]
                     + [Binding(s, _word("offset", off) >> PAGE_SHIFT, s.npages)
                        for s, off in coming])


def _refuse_clash(table: _Bindings, slot: GmemSlot, pgoff: int, npages: int) -> None:
    """Step 18e: no page of [pgoff, pgoff + npages) may be bound already."""
    if _key(slot) in table.by_key:
        raise ValueError(f"slot {slot.as_id}:{slot.id} is already bound to this file")
    clash = table.intersecting(pgoff, pgoff + npages)
    if clash:
        c = clash[0]
        raise KvmError(errno.EINVAL, f"pages [{pgoff:#x}, {pgoff + npages:#x}) overlap "
                       f"pages [{c.pgoff:#x}, {c.end:#x}) bound to slot "
                       f"{c.slot.as_id}:{c.slot.id}")


# -- page identity ------------------------------------------------------------------------------
class _Incarnations:
    """Per-page incarnation numbers as sorted disjoint runs (start, end, n); pages in no run
    are incarnation 0. Immutable: a punch builds a new one."""

    __slots__ = ("runs", "starts")

    def __init__(self, runs: tuple[tuple[int, int, int], ...]) -> None:
        self.runs = runs
        self.starts = tuple(r[0] for r in runs)

    def of(self, index: int) -> int:
        i = bisect_right(self.starts, index) - 1
        if i >= 0 and index < self.runs[i][1]:
            return self.runs[i][2]
        return 0

    def replaced(self, start: int, end: int, n: int) -> _Incarnations:
        runs: list[tuple[int, int, int]] = []
        for s, e, k in self.runs:
            if s < start:
                runs.append((s, min(e, start), k))
            if e > end:
                runs.append((max(s, end), e, k))
        runs.append((start, end, n))
        runs.sort()
        return _Incarnations(tuple(runs))


@dataclass(frozen=True, slots=True)
class GmemFrame:
    """One page of a guest_memfd at one moment (kvmem's pfn for gmem memory). Two frames are
    the same page iff equal. A stage-2 mapping built on a frame is stale once `current()` is
    false: the page was punched (or the file released) since `get_pfn` returned it."""

    file: GuestMemfd
    index: int
    incarnation: int

    @property
    def writable(self) -> bool:
        """Always: guest_memfd slots cannot be read-only (§8.8)."""
        return True

    def current(self) -> bool:
        f = self.file
        return not f._released.value and f._incarnations.value.of(self.index) == self.incarnation

    def view(self, npages: int = 1) -> memoryview:
        """This page (and the `npages - 1` after it) through the direct map (see
        `GuestMemfd.page_view`); the same call as `host.Frame.view`."""
        return self.file.page_view(self.index, npages)

    @property
    def hva(self) -> int:
        """Where this page is in the process: its address in kvmem's direct map (the
        kernel's direct-map address — no slot's hva, and unknown to `host.resolve`). What
        an engine that maps stage-2 pages itself would map. Raises what `view` raises."""
        anchor = ctypes.c_char.from_buffer(self.view())
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor  # the export it holds would keep the window from being unmapped


# -- host mappings ------------------------------------------------------------------------------
class GmemMapping(HostMemory):
    """A MAP_SHARED mapping of a whole guest_memfd at a real hva (made by `GuestMemfd.mmap`).

    `discard` punches the file (so the gmem bracket runs). On a file without
    GUEST_MEMFD_FLAG_INIT_SHARED the mapping stays PROT_NONE: `view()` raises EFAULT, and
    `protect` to anything else and `remap` are refused with EACCES (see the module header).
    Holds a reference to the file: the file is released only after its fd and every mapping
    are closed."""

    def __init__(self, file: GuestMemfd, fd: int) -> None:
        """Takes `fd` (a dup of the file's): closed with the mapping, or here on failure."""
        try:
            super().__init__("memfd" if file._own_backing else "file", file.size, fd, None)
        except BaseException:
            os.close(fd)
            raise
        self.gmem = file
        self._dropped = False
        if not file.host_accessible:
            try:
                HostMemory.protect(self, 0, self.size, PROT_NONE)
            except BaseException:
                HostMemory.close(self)
                raise

    def _refuse_access(self, what: str) -> KvmError:
        return KvmError(errno.EACCES, f"{what}: pages of a guest_memfd without "
                        "GUEST_MEMFD_FLAG_INIT_SHARED are not accessible to the host")

    def view(self) -> memoryview:
        if not self.gmem.host_accessible:
            raise KvmError(errno.EFAULT, "view: pages of a guest_memfd without "
                           "GUEST_MEMFD_FLAG_INIT_SHARED are not accessible to the host")
        return super().view()

    def page_view(self, index: int, npages: int = 1) -> memoryview:
        if not self.gmem.host_accessible:
            raise KvmError(errno.EFAULT, "page_view: pages of a guest_memfd without "
                           "GUEST_MEMFD_FLAG_INIT_SHARED are not accessible to the host")
        return super().page_view(index, npages)

    def discard(self, offset: int, length: int) -> None:
        """Punch [offset, offset+length) of the file (fallocate's rules, §8.2)."""
        if self.closed:
            raise KvmError(errno.EBADF, "host memory is closed")
        self.gmem._punch(offset, length)

    def protect(self, offset: int, length: int, prot: int) -> None:
        if not self.gmem.host_accessible and prot != PROT_NONE:
            raise self._refuse_access("protect")
        super().protect(offset, length, prot)

    def remap(self, offset: int, length: int) -> None:
        if not self.gmem.host_accessible:
            raise self._refuse_access("remap")
        super().remap(offset, length)

    def close(self) -> None:
        # excluded from a punch in flight: it must not discard a mapping half closed
        with self.gmem.invalidate_lock.read():
            if self._dropped:
                return
            self._dropped = True
            super().close()
            self.gmem._mappings.store(tuple(m for m in self.gmem._mappings.load()
                                            if m is not self))
        self.gmem._put()


# -- the file -----------------------------------------------------------------------------------
class GuestMemfd:
    """A guest_memfd file of one VM. Create with `GuestMemfd.create`."""

    def __init__(self, size: int, flags: int, owner: object, backing: int, own_backing: bool,
                 invalidator: GmemInvalidator | None) -> None:
        self._size = size
        self._flags = flags
        self._owner = owner
        self._invalidator = invalidator
        self._backing = backing
        self._own_backing = own_backing
        self.invalidate_lock = sync.RwLock("gmem.invalidate_lock")
        self._bindings: sync.Atomic[_Bindings] = sync.Atomic(_NO_BINDINGS)
        self._incarnations: sync.Atomic[_Incarnations] = sync.Atomic(_Incarnations(()))
        self._punches = 0  # last incarnation handed out (under invalidate_lock, exclusive)
        self._mappings: sync.Atomic[tuple[GmemMapping, ...]] = sync.Atomic(())
        self._refs_lock = sync.Mutex("gmem.refs")
        self._refs = 1  # the fd, plus one per live mapping
        self._fd_open = True
        self._released: sync.Atomic[bool] = sync.Atomic(False)
        self._direct_lock = sync.Mutex("gmem.direct_map")
        self._direct: sync.Atomic[dict[int, memoryview]] = sync.Atomic({})
        self._direct_maps: list[_mmap_module.mmap] = []

    @classmethod
    def create(cls, size: int, flags: int, owner: object, *, private_memory: bool = False,
               invalidator: GmemInvalidator | None = None,
               backing_fd: int | None = None,
               make_backing: Callable[[int, int], int | None] | None = None) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD for the VM `owner` (any object; the file belongs to it
        alone). `private_memory`: the VM has private memory (then INIT_SHARED is refused).
        `invalidator` hears about invalidations of bound pages; `bind` needs one.
        `backing_fd`: the file holding the pages (e.g. a real guest_memfd of the same size
        and flags); it becomes the file's own and is closed at release. Without it kvmem
        creates a memfd of `size` bytes — or asks `make_backing(size, flags)`, once every
        check passed, for the fd to take over (None: the memfd after all). Refused with
        EINVAL as KVM refuses."""
        size_word, flags_word = _word("size", size), _word("flags", flags)
        if not isinstance(private_memory, bool):
            raise TypeError(f"private_memory must be a bool, not {type(private_memory).__name__}")
        if backing_fd is not None and _int("backing_fd", backing_fd) < 0:
            raise ValueError(f"backing_fd={backing_fd} is not a file descriptor")
        args = _Create(_signed(size_word), flags_word, supported_flags(private_memory))
        _check(_CREATE_RULES, args)
        if backing_fd is None and make_backing is not None:
            backing_fd = make_backing(args.size, flags_word)
        if backing_fd is None:
            fd = os.memfd_create("kvmem-gmem", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, args.size)
            except OSError as e:
                os.close(fd)
                raise KvmError(e.errno or errno.ENOMEM, f"KVM_CREATE_GUEST_MEMFD: {e}") from None
            return cls(args.size, flags_word, owner, fd, True, invalidator)
        actual = os.fstat(backing_fd).st_size
        if actual != args.size:
            if make_backing is not None:
                os.close(backing_fd)
            raise ValueError(f"backing_fd has {actual:#x} bytes, not size {args.size:#x}")
        return cls(args.size, flags_word, owner, backing_fd, False, invalidator)

    def __repr__(self) -> str:
        state = "released" if self.released else "closed" if self.closed else "open"
        return f"GuestMemfd(size={self.size:#x}, flags={self.flags:#x}, {state})"

    # -- state ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes; fixed at creation (a guest_memfd cannot be truncated or grown)."""
        return self._size

    @property
    def npages(self) -> int:
        return self._size >> PAGE_SHIFT

    @property
    def flags(self) -> int:
        return self._flags

    @property
    def owner(self) -> object:
        """The VM the file belongs to."""
        return self._owner

    @property
    def invalidator(self) -> GmemInvalidator | None:
        """Who hears about invalidations of bound pages (fixed at creation)."""
        return self._invalidator

    @property
    def mappings(self) -> tuple[GmemMapping, ...]:
        """The live host mappings."""
        return self._mappings.value

    @property
    def fd(self) -> int:
        """The backing file descriptor (for the KVM engine: the real guest_memfd)."""
        self._check_fd()
        return self._backing

    @property
    def closed(self) -> bool:
        """The fd is closed: new requests naming it get EBADF (mappings may live on)."""
        return not self._fd_open

    @property
    def released(self) -> bool:
        """The last reference is gone: bindings dropped, pages freed (§8.4)."""
        return self._released.value

    @property
    def mmap_supported(self) -> bool:
        return bool(self.flags & GUEST_MEMFD_FLAG_MMAP)

    @property
    def host_accessible(self) -> bool:
        """Pages may be touched through a host mapping (GUEST_MEMFD_FLAG_INIT_SHARED)."""
        return bool(self.flags & GUEST_MEMFD_FLAG_INIT_SHARED)

    def _check_fd(self) -> None:
        if not self._fd_open:
            raise KvmError(errno.EBADF, "guest_memfd is closed")

    # -- file operations (fallocate, mmap) ------------------------------------------------------
    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE | KEEP_SIZE): the pages of [offset, offset+length) read as zero
        afterwards and every frame of them stops being current; bound gfns are invalidated
        (§8.5). A range past the end of the file is accepted and changes nothing there."""
        self._check_fd()
        self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        args = _Falloc(_loff("offset", offset), _loff("length", length), self.size)
        _check(_FALLOCATE_RULES, args)
        start = args.offset >> PAGE_SHIFT
        end = (args.offset + args.length) >> PAGE_SHIFT
        with self.invalidate_lock.write():
            self._invalidated(start, end, lambda: self._truncate(start, end))

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(KEEP_SIZE): allocate the pages of [offset, offset+length), which must lie
        inside the file. Contents do not change (a hole still reads as zero)."""
        self._check_fd()
        args = _Falloc(_loff("offset", offset), _loff("length", length), self.size)
        _check(_FALLOCATE_RULES + _ALLOCATE_RULES, args)
        with self.invalidate_lock.read():
            self._fallocate(_FALLOC_FL_KEEP_SIZE, args.offset, args.length)

    def mmap(self) -> GmemMapping:
        """mmap(whole file, PROT_READ|PROT_WRITE, MAP_SHARED): a host mapping at a real hva.
        Refused with ENODEV for a file without GUEST_MEMFD_FLAG_MMAP — after mm's own checks,
        so a file too large for the address space gets ENOMEM either way."""
        self._check_fd()
        if not self.mmap_supported:
            _reserve(self.size)
            raise KvmError(errno.ENODEV, "mmap: guest_memfd was created without "
                           "GUEST_MEMFD_FLAG_MMAP")
        with self.invalidate_lock.read():  # a punch either sees this mapping or is done
            with self._refs_lock:
                self._refs += 1
            try:
                m = GmemMapping(self, os.dup(self._backing))
            except BaseException as e:
                with self._refs_lock:
                    self._refs -= 1
                if isinstance(e, OSError) and not isinstance(e, KvmError):
                    raise KvmError(e.errno or errno.ENOMEM, f"mmap: {e.strerror}") from None
                raise
            self._mappings.store((*self._mappings.load(), m))
        return m

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _fallocate(self._backing, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise KvmError(err, f"fallocate(mode={mode}, {offset:#x}, {length:#x}) on the "
                           f"backing file: {os.strerror(err)}")

    # -- invalidation (§8.5) ------------------------------------------------------------------
    def _invalidated(self, start: int, end: int, change: Callable[[], None] | None) -> None:
        """Run `change` inside the invalidation bracket of page indices [start, end)."""
        self.invalidate_lock.assert_write_held()
        ranges = [b.gfns(start, end) for b in self._bindings.load().intersecting(start, end)]
        inv = self._invalidator
        if ranges:
            assert inv is not None  # bind refuses without one
            inv.gmem_invalidate_begin()
        try:
            for r in ranges:
                assert inv is not None
                inv.gmem_invalidate_range(r.as_id, r.start, r.end)
            if change is not None:
                change()
        finally:
            if ranges:
                assert inv is not None
                inv.gmem_invalidate_end()

    def _truncate(self, start: int, end: int) -> None:
        """truncate_inode_pages_range: replace pages [start, end) ∩ the file by holes."""
        self.invalidate_lock.assert_write_held()
        end = min(end, self.npages)
        if start >= end:
            return
        # identities die before the memory changes: whoever checks `current()` after the data
        # moved must see the old page as gone (a failed step below leaves them gone: safe)
        self._punches += 1
        self._incarnations.store(self._incarnations.load().replaced(start, end, self._punches))
        offset, length = start << PAGE_SHIFT, (end - start) << PAGE_SHIFT
        # the host mappings' own hva bracket runs inside this one, as truncation unmaps user
        # page tables inside kvm_gmem_punch_hole's; then the file itself loses the pages
        for m in self._mappings.load():
            HostMemory.discard(m, offset, length)
        self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    # -- bindings (§8.3 step 18, §8.5) --------------------------------------------------------
    def bind(self, slot: GmemSlot, offset: int, *, owner: object) -> Binding:
        """kvm_gmem_bind: back `slot` (all of its `npages`) with the file from byte `offset`
        (REGION2's guest_memfd_offset). `owner` is the VM asking. EBADF once the fd is
        closed; EINVAL for another VM, an offset negative as signed or unaligned, a range
        past the end of the file (compared as KVM does, see `_wrapped_end`), or a page
        already bound to any slot."""
        pgoff, npages = self._bind_checks(slot, offset, owner)
        with self.invalidate_lock.write():
            table = self._bindings.load()
            _refuse_clash(table, slot, pgoff, npages)
            binding = Binding(slot, pgoff, npages)
            self._bindings.store(_Bindings((*table.items, binding)))
        return binding

    def check_bind(self, slot: GmemSlot, offset: int, *, owner: object,
                   leaving: Sequence[GmemSlot] = (),
                   coming: Sequence[tuple[GmemSlot, int]] = ()) -> None:
        """Every check of `bind`, in its order, without binding — against the bindings as
        they will be once the slots of `leaving` are unbound and `coming` ((slot, offset)
        pairs, each checked before) are bound. A VM's update path checks a whole batch this
        way before it changes anything, then makes it with `rebind`."""
        pgoff, npages = self._bind_checks(slot, offset, owner)
        _refuse_clash(_planned(self._bindings.load(), leaving, coming), slot, pgoff, npages)

    def rebind(self, leaving: Sequence[GmemSlot], coming: Sequence[tuple[GmemSlot, int]]
               ) -> None:
        """Unbind the slots of `leaving` and bind `coming` ((slot, offset) pairs that
        `check_bind` accepted) in one step: a lockless reader sees the bindings before or
        after, never between. The fd is not looked at (the caller checked it; a close since
        only stops new requests, as a close after KVM's fget does). On a released file
        nothing happens: release dropped every binding, and would have dropped these."""
        with self.invalidate_lock.write():
            if self._released.load():
                return
            table = _planned(self._bindings.load(), leaving, ())
            for slot, offset in coming:
                pgoff = _word("offset", offset) >> PAGE_SHIFT
                _refuse_clash(table, slot, pgoff, slot.npages)
                table = _Bindings((*table.items, Binding(slot, pgoff, slot.npages)))
            self._bindings.store(table)

    def _bind_checks(self, slot: GmemSlot, offset: int, owner: object) -> tuple[int, int]:
        """bind's argument checks and steps 18a-18d; (first page, pages) of the binding."""
        word = _word("offset", offset)
        npages = _int("slot.npages", slot.npages)
        if npages <= 0:
            raise ValueError(f"slot.npages={npages} must be positive")
        for name in ("as_id", "id", "base_gfn"):
            _int(f"slot.{name}", getattr(slot, name))
        self._check_fd()
        args = _Bind(_signed(word), npages, self.size, owner is self.owner)
        _check(_BIND_RULES, args)
        if self._invalidator is None:  # after KVM's checks: another VM's file is EINVAL
            raise ValueError("bind: this file has no invalidator to tell about its bindings")
        return word >> PAGE_SHIFT, npages

    def unbind(self, slot: GmemSlot) -> bool:
        """kvm_gmem_unbind: forget the binding of `slot` (no invalidation: the slot's DELETE
        zaps). False if it had none (e.g. the file was released first)."""
        with self.invalidate_lock.write():
            table = self._bindings.load()
            binding = table.by_key.get(_key(slot))
            if binding is None:
                return False
            self._bindings.store(_Bindings([b for b in table.items if b is not binding]))
            return True

    @property
    def bindings(self) -> tuple[Binding, ...]:
        """Every binding, by page offset."""
        return self._bindings.value.items

    def binding_at(self, index: int) -> Binding | None:
        """The binding of page `index`, if any (lockless)."""
        return self._bindings.value.at(_int("index", index))

    def bindings_in(self, start: int, end: int) -> tuple[GfnRange, ...]:
        """The gfn ranges that pages [start, end) map, one per intersecting binding:
        [base + max(pgoff, start) - pgoff, base + min(pgoff + npages, end) - pgoff)."""
        start, end = _int("start", start), _int("end", end)
        return tuple(b.gfns(start, end) for b in self._bindings.value.intersecting(start, end))

    # -- kvmem's own fault path -----------------------------------------------------------------
    def get_pfn(self, slot: GmemSlot, gfn: int) -> GmemFrame:
        """kvm_gmem_get_pfn: the page behind `gfn` of `slot`. EFAULT if the slot is not bound
        to this file (never was, unbound, or the file was released); EIO if the gfn's page is
        not bound to this slot. A hole is fine: it reads as zero. No lock: a fault checks the
        MMU's sequence afterwards (§5), and `current()` tells a punched page."""
        gfn = _int("gfn", gfn)
        if self._released.value:
            raise KvmError(errno.EFAULT, "guest_memfd is released")
        table = self._bindings.value
        binding = table.by_key.get(_key(slot))
        if binding is None or binding.slot != slot:
            raise KvmError(errno.EFAULT, f"slot {slot.as_id}:{slot.id} is not bound to this "
                           "guest_memfd")
        index = binding.index_of(gfn)
        if table.at(index) is not binding:
            raise KvmError(errno.EIO, f"gfn {gfn:#x} gives page {index:#x}, which slot "
                           f"{slot.as_id}:{slot.id} does not bind")
        return GmemFrame(self, index, self._incarnations.value.of(index))

    def page_view(self, index: int, npages: int = 1) -> memoryview:
        """A writable view of pages [index, index + npages) through the direct map (no hva,
        not dirty-logged, blind to INIT_SHARED, as the kernel's own access is). It shows
        whatever the file holds there at the time of each access: after a punch it reads
        zeros, so keep a `GmemFrame` to know whether it is still the same page. EFAULT past
        the end of the file, after release, and for a handed-in file kvmem cannot map (one
        without both MMAP and INIT_SHARED: its pages are the kernel's alone). A run must stay
        inside one 1 GiB-aligned window (any aligned huge page does), else ValueError."""
        index, npages = _int("index", index), _int("npages", npages)
        if npages <= 0:
            raise ValueError(f"npages={npages} must be positive")
        if self._released.value:
            raise KvmError(errno.EFAULT, "guest_memfd is released")
        if index < 0 or index + npages > self.npages:
            raise KvmError(errno.EFAULT, f"pages [{index:#x}, {index + npages:#x}) are outside "
                           f"the file ({self.npages:#x} pages)")
        if not self._own_backing and not (self.mmap_supported and self.host_accessible):
            raise KvmError(errno.EFAULT, "the pages of this guest_memfd are not reachable "
                           "from user space (no MMAP | INIT_SHARED)")
        chunk, offset = divmod(index << PAGE_SHIFT, _DIRECT_CHUNK)
        end = offset + (npages << PAGE_SHIFT)
        if end > _DIRECT_CHUNK:
            raise ValueError(f"pages [{index:#x}, {index + npages:#x}) cross a 1 GiB boundary")
        window = self._direct.value.get(chunk)
        if window is None:
            window = self._map_window(chunk)
        return window[offset:end]

    def _map_window(self, chunk: int) -> memoryview:
        with self._direct_lock:
            window = self._direct.load().get(chunk)
            if window is not None:
                return window
            if self._released.load():
                raise KvmError(errno.EFAULT, "guest_memfd is released")
            start = chunk * _DIRECT_CHUNK
            m = _mmap_module.mmap(self._backing, min(_DIRECT_CHUNK, self.size - start),
                                  flags=_mmap_module.MAP_SHARED,
                                  prot=_mmap_module.PROT_READ | _mmap_module.PROT_WRITE,
                                  offset=start)
            self._direct_maps.append(m)
            window = memoryview(m)
            self._direct.store({**self._direct.load(), chunk: window})
            return window

    # -- lifetime (§8.4) --------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd. The file is released when its last mapping is closed too (at once if
        it has none): every binding's slot loses the file (`get_pfn` → EFAULT), all bound gfns
        are invalidated ([0, ∞) of the file), the bindings are dropped and the pages freed."""
        with self._refs_lock:
            if not self._fd_open:
                return
            self._fd_open = False
        self._put()

    def __enter__(self) -> GuestMemfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self) -> None:
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._release()

    def _release(self) -> None:
        """kvm_gmem_release (the VM's slots_lock is not taken here: kvmem's slots never free
        a slot under a binding, and unbind is excluded by the invalidate lock)."""
        with self.invalidate_lock.write():
            # slots lose the file before the zap, so no fault can map a page after it
            self._released.store(True)
            self._invalidated(0, _INDEX_END, None)
            self._bindings.store(_NO_BINDINGS)
        with self._direct_lock:
            self._direct.store({})
            for m in self._direct_maps:
                # a page view still alive keeps its window mapped until it dies
                with contextlib.suppress(BufferError):
                    m.close()
            self._direct_maps.clear()
        os.close(self._backing)


def _reserve(length: int) -> None:
    """Raise mm's ENOMEM if no `length`-byte mapping fits the address space (mmap checks the
    room before it asks the file)."""
    addr = _mmap(None, length, PROT_NONE,
                 _mmap_module.MAP_PRIVATE | _mmap_module.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise KvmError(err, f"mmap of {length:#x} bytes: {os.strerror(err)}")
    _munmap(addr, length)
