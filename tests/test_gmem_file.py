"""guest_memfd files (`kvmem.gmem`, kvm-semantics §8.2-§8.5), without /dev/kvm.

A VMM relies on: KVM_CREATE_GUEST_MEMFD's checks and errnos; fallocate's (punch a hole: the
pages read as zero afterwards and a page identity taken before is no longer current;
allocate: nothing visible changes); host mappings only for MMAP files, and never a host touch
of a page of a file without INIT_SHARED; bindings that refuse any page bound twice (EINVAL);
for a punch, the MMU told begin -> one gfn range per intersecting binding -> (the pages
change) -> end, and nothing at all when no binding intersects; the bindings frozen for the
whole bracket; release (last close) telling the MMU about every binding and making the
slots' faults fail. Refused calls change nothing. The real kernel's answers for the same
calls are compared in test_gmem_kvm.py.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator

import pytest

from kvmem import host
from kvmem.errors import KvmError
from kvmem.gmem import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GmemFrame,
    GuestMemfd,
    SlotRef,
    supported_flags,
)

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
VM = object()  # the owner: any object identifies a VM


class Recorder:
    """A fake MMU: records every call, and what a probe saw at that moment."""

    def __init__(self, probe: object = None) -> None:
        self.events: list[tuple[object, ...]] = []
        self.probe = probe

    def _seen(self) -> object:
        return self.probe() if callable(self.probe) else None

    def gmem_invalidate_begin(self) -> None:
        self.events.append(("begin", self._seen()))

    def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
        self.events.append(("range", as_id, gfn_start, gfn_end, self._seen()))

    def gmem_invalidate_end(self) -> None:
        self.events.append(("end", self._seen()))

    def calls(self) -> list[tuple[object, ...]]:
        return [e[:-1] for e in self.events]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def files() -> Iterator[list[GuestMemfd]]:
    made: list[GuestMemfd] = []
    yield made
    for f in made:
        for m in f.mappings:
            m.close()
        f.close()


def make(files: list[GuestMemfd], size: int = MiB, flags: int = MMAP | SHARED,
         rec: Recorder | None = None) -> GuestMemfd:
    f = GuestMemfd.create(size, flags, VM, invalidator=rec)
    files.append(f)
    return f


def refused(err: int, fn: object, *args: object, **kw: object) -> KvmError:
    assert callable(fn)
    with pytest.raises(KvmError) as info:
        fn(*args, **kw)
    assert info.value.errno == err, str(info.value)
    return info.value


def fill(f: GuestMemfd, index: int, byte: int) -> None:
    f.page_view(index)[:] = bytes([byte]) * PAGE


def first(f: GuestMemfd, index: int) -> int:
    return f.page_view(index)[0]


# -- KVM_CREATE_GUEST_MEMFD ------------------------------------------------------------------
@pytest.mark.parametrize("flags", [0, MMAP, SHARED, MMAP | SHARED])
def test_create_accepts_every_supported_flag_combination(files: list[GuestMemfd],
                                                         flags: int) -> None:
    f = make(files, 2 * PAGE, flags)
    assert (f.size, f.npages, f.flags, f.owner) == (2 * PAGE, 2, flags, VM)
    assert first(f, 1) == 0


def test_supported_flags_is_kvm_cap_guest_memfd_flags() -> None:
    assert supported_flags(private_memory=False) == MMAP | SHARED == 3
    assert supported_flags(private_memory=True) == MMAP == 1


@pytest.mark.parametrize(("size", "flags", "private"), [
    (PAGE, 1 << 2, False),          # NO_DIRECT_MAP is not supported here
    (PAGE, 1 << 63, False),
    (PAGE, -1, False),              # all 64 bits
    (PAGE, SHARED, True),           # INIT_SHARED on a VM with private memory
    (PAGE, MMAP | SHARED, True),
    (0, 0, False),
    (PAGE + 1, 0, False),
    (100, 0, False),
    (1 << 63, 0, False),            # negative as signed
    ((1 << 64) - PAGE, 0, False),
    (-PAGE, 0, False),              # the same request as 2^64 - 4096
    ((1 << 64) - 1, 0, False),
])
def test_create_refusals_are_einval(size: int, flags: int, private: bool) -> None:
    refused(errno.EINVAL, GuestMemfd.create, size, flags, VM, private_memory=private)


def test_create_checks_flags_before_size() -> None:
    err = refused(errno.EINVAL, GuestMemfd.create, 0, 1 << 5, VM)
    assert "flags" in err.message


def test_create_takes_the_largest_size_lazily(files: list[GuestMemfd]) -> None:
    f = make(files, (1 << 63) - PAGE, 0)
    last = f.npages - 1
    fill(f, last, 7)
    assert first(f, last) == 7 and first(f, 0) == 0


def test_private_memory_vm_still_gets_mmap_files(files: list[GuestMemfd]) -> None:
    f = GuestMemfd.create(PAGE, MMAP, VM, private_memory=True)
    files.append(f)
    assert f.mmap_supported and not f.host_accessible


@pytest.mark.parametrize(("args", "exc"), [
    ((True, 0), TypeError), ((4096.0, 0), TypeError), ((PAGE, "1"), TypeError),
    ((PAGE, None), TypeError), ((1 << 64, 0), ValueError), ((-(1 << 63) - 1, 0), ValueError),
    ((PAGE, 1 << 64), ValueError),
])
def test_create_bad_argument_types(args: tuple[object, object], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        GuestMemfd.create(args[0], args[1], VM)  # type: ignore[arg-type]


def test_a_backing_fd_is_taken_over_and_must_have_the_size() -> None:
    fd = os.memfd_create("other")
    os.ftruncate(fd, 2 * PAGE)
    with pytest.raises(ValueError, match="size"):
        GuestMemfd.create(PAGE, 0, VM, backing_fd=fd)
    refused(errno.EINVAL, GuestMemfd.create, PAGE + 1, 0, VM, backing_fd=fd)
    f = GuestMemfd.create(2 * PAGE, MMAP | SHARED, VM, backing_fd=fd)
    os.pwrite(fd, b"x", PAGE)
    assert first(f, 1) == ord("x") and f.fd == fd
    f.close()
    with pytest.raises(OSError):  # the file owned the fd and closed it at release
        os.fstat(fd)


def test_a_handed_in_file_without_mmap_and_init_shared_is_the_kernels_alone() -> None:
    # a real guest_memfd cannot be read by user space then: kvmem does not try
    fd = os.memfd_create("gmem-stand-in")
    os.ftruncate(fd, PAGE)
    for flags in (0, MMAP, SHARED):
        f = GuestMemfd.create(PAGE, flags, VM, backing_fd=os.dup(fd))
        refused(errno.EFAULT, f.page_view, 0)
        f.close()
    os.close(fd)


def test_size_is_immutable(files: list[GuestMemfd]) -> None:
    f = make(files)
    with pytest.raises(AttributeError):
        f.size = 2 * MiB  # type: ignore[misc]


# -- fallocate -----------------------------------------------------------------------------------
BIG = (1 << 63) - PAGE
FALLOCATE_REFUSALS = [
    # (offset, length, errno) for both punch and allocate, in the kernel's check order
    (-PAGE, PAGE, errno.EINVAL),
    ((1 << 64) - PAGE, PAGE, errno.EINVAL),      # = -4096
    (0, 0, errno.EINVAL),
    (0, -PAGE, errno.EINVAL),
    (0, 1 << 63, errno.EINVAL),                  # negative length
    (-1, 3, errno.EINVAL),                       # negativity before alignment
    (BIG, PAGE, errno.EFBIG),                    # offset + length = 2^63
    (PAGE, BIG, errno.EFBIG),
    (1 << 62, 1 << 62, errno.EFBIG),
    (3, (1 << 63) - 3, errno.EFBIG),             # overflow before alignment
    (3, PAGE, errno.EINVAL),
    (0, PAGE + 1, errno.EINVAL),
    (0, 100, errno.EINVAL),
]


@pytest.mark.parametrize(("offset", "length", "err"), FALLOCATE_REFUSALS)
def test_punch_and_allocate_refusals(files: list[GuestMemfd], rec: Recorder, offset: int,
                                     length: int, err: int) -> None:
    f = make(files, rec=rec)
    f.bind(SlotRef(0, 0, 0, f.npages), 0, owner=VM)
    fill(f, 0, 1)
    frame = f.get_pfn(SlotRef(0, 0, 0, f.npages), 0)
    refused(err, f.punch_hole, offset, length)
    refused(err, f.allocate, offset, length)
    assert first(f, 0) == 1 and frame.current() and rec.events == []


def test_punch_past_the_end_is_accepted_and_changes_nothing(files: list[GuestMemfd],
                                                            rec: Recorder) -> None:
    f = make(files, rec=rec)
    f.bind(SlotRef(0, 0, 0, f.npages), 0, owner=VM)
    fill(f, f.npages - 1, 9)
    f.punch_hole(MiB, PAGE)
    f.punch_hole(BIG - PAGE, PAGE)
    f.punch_hole(PAGE, BIG - PAGE)  # ends exactly at 2^63 - 1 + 1 - 4096: no EFBIG
    assert rec.events == [("begin", None), ("range", 0, 1, f.npages, None), ("end", None)]
    assert first(f, f.npages - 1) == 0
    rec.events.clear()
    f.punch_hole(MiB, 4 * PAGE)
    assert rec.events == []


def test_allocate_stops_at_the_size(files: list[GuestMemfd]) -> None:
    f = make(files)
    f.allocate(0, MiB)
    f.allocate(MiB - PAGE, PAGE)
    refused(errno.EINVAL, f.allocate, MiB - PAGE, 2 * PAGE)
    refused(errno.EINVAL, f.allocate, MiB, PAGE)


def test_punch_zeroes_exactly_its_pages_and_allocate_changes_nothing(
        files: list[GuestMemfd]) -> None:
    f = make(files, 8 * PAGE)
    for i in range(8):
        fill(f, i, 0x10 + i)
    f.allocate(0, 8 * PAGE)
    assert [first(f, i) for i in range(8)] == [0x10 + i for i in range(8)]
    f.punch_hole(2 * PAGE, 3 * PAGE)
    assert [first(f, i) for i in range(8)] == [0x10, 0x11, 0, 0, 0, 0x15, 0x16, 0x17]
    assert bytes(f.page_view(3)) == bytes(PAGE)
    f.allocate(2 * PAGE, PAGE)
    assert first(f, 2) == 0


def test_fallocate_argument_types(files: list[GuestMemfd]) -> None:
    f = make(files)
    for bad in (True, 1.0, "0", None):
        with pytest.raises(TypeError, match="offset"):
            f.punch_hole(bad, PAGE)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="length"):
            f.allocate(0, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset"):
        f.punch_hole(1 << 64, PAGE)


# -- page identity (kvmem's fault path) ----------------------------------------------------------
def test_a_frame_is_current_until_its_page_is_punched(files: list[GuestMemfd],
                                                      rec: Recorder) -> None:
    f = make(files, 8 * PAGE, rec=rec)
    slot = SlotRef(0, 1, 0x100, 8)
    f.bind(slot, 0, owner=VM)
    frames = [f.get_pfn(slot, 0x100 + i) for i in range(8)]
    assert all(isinstance(fr, GmemFrame) and fr.current() and fr.writable for fr in frames)
    assert f.get_pfn(slot, 0x103) == frames[3]
    f.allocate(0, 8 * PAGE)
    assert all(fr.current() for fr in frames)
    f.punch_hole(3 * PAGE, 2 * PAGE)
    assert [fr.current() for fr in frames] == [True] * 3 + [False] * 2 + [True] * 3
    again = f.get_pfn(slot, 0x103)
    assert again != frames[3] and again.current()
    f.punch_hole(0, 8 * PAGE)
    assert not again.current()


def test_frame_view_is_the_page(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 4 * PAGE, rec=rec)
    slot = SlotRef(0, 1, 0x40, 2)
    f.bind(slot, 2 * PAGE, owner=VM)
    fr = f.get_pfn(slot, 0x41)
    assert fr.index == 3
    fr.view()[:5] = b"hello"
    assert bytes(f.page_view(3)[:5]) == b"hello"


def test_get_pfn_refusals(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 4 * PAGE, rec=rec)
    slot = SlotRef(0, 1, 0x40, 2)
    refused(errno.EFAULT, f.get_pfn, slot, 0x40)            # never bound
    f.bind(slot, 0, owner=VM)
    refused(errno.EIO, f.get_pfn, slot, 0x42)               # gfn past the slot: page 2
    refused(errno.EIO, f.get_pfn, slot, 0x3f)
    refused(errno.EFAULT, f.get_pfn, SlotRef(0, 1, 0x80, 2), 0x80)  # another slot 0:1
    f.unbind(slot)
    refused(errno.EFAULT, f.get_pfn, slot, 0x40)


def test_page_view_refusals(files: list[GuestMemfd]) -> None:
    f = make(files, 2 * PAGE)
    refused(errno.EFAULT, f.page_view, 2)
    refused(errno.EFAULT, f.page_view, -1)
    refused(errno.EFAULT, f.page_view, 1, 2)
    with pytest.raises(TypeError):
        f.page_view(True)
    with pytest.raises(ValueError):
        f.page_view(0, 0)


def test_page_view_of_a_run_and_a_huge_page(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 2 * GiB, 0, rec=rec)
    huge = 512  # 2 MiB
    run = f.page_view(GiB // PAGE - huge, huge)           # the last 2 MiB of the first GiB
    assert len(run) == huge * PAGE
    run[-1] = 0x5A
    assert f.page_view(GiB // PAGE - 1)[-1] == 0x5A
    with pytest.raises(ValueError, match="1 GiB"):
        f.page_view(GiB // PAGE - 1, 2)
    slot = SlotRef(0, 0, 0x100000, 2 * huge)
    f.bind(slot, GiB - huge * PAGE, owner=VM)
    assert f.get_pfn(slot, 0x100000).view(huge)[-1] == 0x5A


# -- host mappings -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [0, SHARED])
def test_mmap_needs_the_mmap_flag(files: list[GuestMemfd], flags: int) -> None:
    f = make(files, flags=flags)
    refused(errno.ENODEV, f.mmap)


def test_mmap_too_large_for_the_address_space_is_enomem_first() -> None:
    for flags in (0, MMAP | SHARED):
        f = GuestMemfd.create(1 << 62, flags, VM)
        refused(errno.ENOMEM, f.mmap)
        f.close()
        assert f.released  # the failed mmap kept no reference


def test_files_and_mappings_leak_no_descriptors() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for flags in range(4):
        f = GuestMemfd.create(4 * PAGE, flags, VM)
        fill(f, 3, 1)
        if flags & MMAP:
            f.mmap().close()
            m = f.mmap()
            f.close()
            m.close()
        else:
            f.close()
    assert open_fds() == before


def test_shared_mapping_is_the_file(files: list[GuestMemfd]) -> None:
    f = make(files, 4 * PAGE)
    a, b = f.mmap(), f.mmap()
    assert a.hva != b.hva and a.size == 4 * PAGE
    a.view()[PAGE:PAGE + 3] = b"abc"
    assert bytes(b.view()[PAGE:PAGE + 3]) == b"abc" == bytes(f.page_view(1)[:3])
    f.page_view(2)[0] = 0x42
    assert a.view()[2 * PAGE] == 0x42
    assert host.accessible(a.hva, 4 * PAGE, host.PROT_RW) == 4 * PAGE


def test_pages_of_a_file_without_init_shared_are_never_touched_by_the_host(
        files: list[GuestMemfd]) -> None:
    f = make(files, 4 * PAGE, MMAP)
    m = f.mmap()
    assert host.accessible(m.hva, PAGE, host.PROT_READ) == 0  # accessors get EFAULT
    assert host.resolve(m.hva, write=False) is None           # so do hva faults
    refused(errno.EFAULT, m.view)
    refused(errno.EFAULT, m.page_view, 0)
    refused(errno.EACCES, m.protect, 0, PAGE, host.PROT_READ)
    refused(errno.EACCES, m.remap, 0, PAGE)
    m.protect(0, PAGE, host.PROT_NONE)
    fill(f, 1, 5)  # kvmem's own (direct-map) access is not the host's
    m.discard(PAGE, PAGE)
    assert first(f, 1) == 0
    assert host.accessible(m.hva, 4 * PAGE, host.PROT_READ) == 0


def test_punch_replaces_the_mapped_pages(files: list[GuestMemfd]) -> None:
    f = make(files, 4 * PAGE)
    m = f.mmap()
    m.view()[:] = b"\xaa" * (4 * PAGE)
    before = [host.resolve(m.hva + i * PAGE, write=True) for i in range(4)]
    f.punch_hole(PAGE, 2 * PAGE)
    assert bytes(m.view()[PAGE:3 * PAGE]) == bytes(2 * PAGE)
    assert m.view()[0] == m.view()[3 * PAGE] == 0xAA
    assert [fr is not None and fr.current() for fr in before] == [True, False, False, True]


def test_discard_through_a_mapping_is_a_punch(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 4 * PAGE, rec=rec)
    f.bind(SlotRef(0, 0, 0x10, 4), 0, owner=VM)
    m = f.mmap()
    m.view()[:] = b"\x01" * (4 * PAGE)
    m.discard(2 * PAGE, PAGE)
    assert rec.calls() == [("begin",), ("range", 0, 0x12, 0x13), ("end",)]
    assert first(f, 2) == 0 and first(f, 1) == 1
    refused(errno.EINVAL, m.discard, 1, PAGE)


class HvaRecorder:
    def __init__(self, log: list[tuple[object, ...]]) -> None:
        self.log = log

    def invalidate_range_start(self, start: int, end: int) -> None:
        self.log.append(("hva-start", start, end))

    def invalidate_range_end(self, start: int, end: int) -> None:
        self.log.append(("hva-end", start, end))


def test_host_mapping_invalidation_nests_inside_the_gmem_bracket(files: list[GuestMemfd]) -> None:
    log: list[tuple[object, ...]] = []

    class Mmu(Recorder):
        def gmem_invalidate_begin(self) -> None:
            log.append(("begin",))

        def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
            log.append(("range", gfn_start, gfn_end))

        def gmem_invalidate_end(self) -> None:
            log.append(("end",))

    f = make(files, 4 * PAGE, rec=Mmu())
    f.bind(SlotRef(0, 0, 0, 4), 0, owner=VM)
    m = f.mmap()
    hva = HvaRecorder(log)
    host.notifiers.register(hva)
    try:
        f.punch_hole(PAGE, PAGE)
    finally:
        host.notifiers.unregister(hva)
    assert log == [("begin",), ("range", 1, 2), ("hva-start", m.hva + PAGE, m.hva + 2 * PAGE),
                   ("hva-end", m.hva + PAGE, m.hva + 2 * PAGE), ("end",)]


# -- bindings ------------------------------------------------------------------------------------
def test_bind_refusals(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 16 * PAGE, rec=rec)
    a = SlotRef(0, 1, 0x100, 4)
    f.bind(a, 4 * PAGE, owner=VM)                                   # pages [4, 8)
    cases = [
        (SlotRef(0, 2, 0x200, 4), 0, object(), "another VM"),
        (SlotRef(0, 2, 0x200, 4), -PAGE, VM, "negative"),
        (SlotRef(0, 2, 0x200, 4), 1 << 63, VM, "negative"),
        (SlotRef(0, 2, 0x200, 4), 3, VM, "multiple"),
        (SlotRef(0, 2, 0x200, 4), 13 * PAGE, VM, "end"),            # [13, 17) > 16 pages
        (SlotRef(0, 2, 0x200, 1), 16 * PAGE, VM, "end"),            # offset == size
        (SlotRef(0, 2, 0x200, 17), 0, VM, "end"),
        (SlotRef(0, 2, 0x200, 1), 7 * PAGE, VM, "overlap"),          # last page of a
        (SlotRef(0, 2, 0x200, 8), 0, VM, "overlap"),                 # covers a's first
        (SlotRef(1, 2, 0x100, 2), 5 * PAGE, VM, "overlap"),          # other AS, same pages
    ]
    for slot, offset, owner, words in cases:
        err = refused(errno.EINVAL, f.bind, slot, offset, owner=owner)
        assert words in err.message, (slot, offset, err.message)
    assert [(b.slot, b.pgoff, b.npages) for b in f.bindings] == [(a, 4, 4)]
    assert rec.events == []
    f.bind(SlotRef(0, 2, 0x200, 4), 0, owner=VM)                   # adjacent: fine
    f.bind(SlotRef(1, 3, 0x100, 8), 8 * PAGE, owner=VM)            # any AS, any gfn
    assert [b.pgoff for b in f.bindings] == [0, 4, 8]


def test_bind_compares_the_end_as_kvm_does(files: list[GuestMemfd], rec: Recorder) -> None:
    # offset + size is an loff_t sum in KVM: past 2^63 it wraps negative and passes
    # (measured on this host: test_gmem_kvm.py::test_bind_offset_wrap_matches_kernel)
    f = make(files, MiB, rec=rec)
    b = f.bind(SlotRef(0, 1, 0, 2), (1 << 63) - PAGE, owner=VM)
    assert (b.pgoff, b.end) == ((1 << 51) - 1, (1 << 51) + 1)
    refused(errno.EINVAL, f.bind, SlotRef(0, 2, 0x10, 1), (1 << 63) - PAGE, owner=VM)
    refused(errno.EINVAL, f.bind, SlotRef(0, 2, 0x10, 1), (1 << 62), owner=VM)


def test_bind_needs_an_open_fd_and_an_invalidator(files: list[GuestMemfd],
                                                  rec: Recorder) -> None:
    f = make(files, 4 * PAGE)
    with pytest.raises(ValueError, match="invalidator"):
        f.bind(SlotRef(0, 0, 0, 1), 0, owner=VM)
    g = make(files, 4 * PAGE, rec=rec)
    m = g.mmap()  # keeps the file alive past its fd
    g.close()
    assert g.closed and not g.released
    refused(errno.EBADF, g.bind, SlotRef(0, 0, 0, 1), 0, owner=VM)
    refused(errno.EBADF, g.punch_hole, 0, PAGE)
    refused(errno.EBADF, g.allocate, 0, PAGE)
    refused(errno.EBADF, g.mmap)
    m.view()[0] = 3
    m.discard(0, PAGE)  # the mapping still punches
    assert m.view()[0] == 0
    m.close()
    assert g.released


def test_unbind_and_rebind_keep_the_data(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 4 * PAGE, rec=rec)
    a = SlotRef(0, 1, 0x100, 2)
    f.bind(a, 0, owner=VM)
    f.get_pfn(a, 0x101).view()[0] = 0x77
    assert f.unbind(a) and not f.unbind(a)
    assert rec.events == []                                         # DELETE zaps, not unbind
    assert f.bindings_in(0, 4) == ()
    b = SlotRef(0, 9, 0x900, 2)
    f.bind(b, 0, owner=VM)
    assert f.get_pfn(b, 0x901).view()[0] == 0x77


def test_bindings_in_follows_kvms_formula(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 8 * MiB, rec=rec)
    a = SlotRef(0, 1, GiB >> 12, 1024)           # pages 0-1023 at 1 GiB
    b = SlotRef(0, 2, (16 * GiB) >> 12, 1024)    # pages 1024-2047 at 16 GiB
    f.bind(a, 0, owner=VM)
    f.bind(b, 4 * MiB, owner=VM)
    got = [(r.as_id, r.start, r.end, r.slot) for r in f.bindings_in(768, 1280)]  # [3, 5) MiB
    assert got == [(0, (GiB + 3 * MiB) >> 12, (GiB + 4 * MiB) >> 12, a),
                   (0, (16 * GiB) >> 12, (16 * GiB + MiB) >> 12, b)]
    assert f.bindings_in(2048, 4096) == ()
    assert f.bindings_in(1023, 1024)[0].start == (GiB >> 12) + 1023
    assert f.binding_at(1024) is not None and f.binding_at(1024).slot == b  # type: ignore[union-attr]
    assert f.binding_at(2048) is None


# -- invalidation --------------------------------------------------------------------------------
def test_punch_brackets_the_change_per_intersecting_binding(files: list[GuestMemfd]) -> None:
    rec = Recorder()
    f = make(files, 8 * MiB, rec=rec)
    a = SlotRef(0, 1, GiB >> 12, 1024)
    b = SlotRef(0, 2, (16 * GiB) >> 12, 1024)
    f.bind(a, 0, owner=VM)
    f.bind(b, 4 * MiB, owner=VM)
    fill(f, 900, 0xEE)
    frame = f.get_pfn(a, (GiB >> 12) + 900)
    rec.probe = lambda: (frame.current(), first(f, 900))
    f.punch_hole(3 * MiB, 2 * MiB)
    assert rec.events == [
        ("begin", (True, 0xEE)),
        ("range", 0, (GiB + 3 * MiB) >> 12, (GiB + 4 * MiB) >> 12, (True, 0xEE)),
        ("range", 0, (16 * GiB) >> 12, (16 * GiB + MiB) >> 12, (True, 0xEE)),
        ("end", (False, 0)),                       # the pages changed between ranges and end
    ]
    rec.probe = None


def test_no_intersecting_binding_means_no_begin(files: list[GuestMemfd], rec: Recorder) -> None:
    f = make(files, 16 * PAGE, rec=rec)
    f.punch_hole(0, 16 * PAGE)
    f.bind(SlotRef(0, 1, 0, 4), 4 * PAGE, owner=VM)
    f.punch_hole(0, 4 * PAGE)
    f.punch_hole(8 * PAGE, 8 * PAGE)
    assert rec.events == []
    f.punch_hole(7 * PAGE, 2 * PAGE)
    assert rec.calls() == [("begin",), ("range", 0, 3, 4), ("end",)]


def test_bindings_stay_put_from_begin_to_end(files: list[GuestMemfd]) -> None:
    done: list[str] = []
    started = threading.Event()

    class Slow(Recorder):
        def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
            started.set()
            time.sleep(0.2)            # a bind in another thread must wait for the end
            done.append("range")

        def gmem_invalidate_end(self) -> None:
            done.append("end")

    f = make(files, 8 * PAGE, rec=Slow())
    f.bind(SlotRef(0, 1, 0, 4), 0, owner=VM)

    def binder() -> None:
        started.wait()
        f.bind(SlotRef(0, 2, 0x10, 4), 4 * PAGE, owner=VM)
        done.append("bind")

    t = threading.Thread(target=binder)
    t.start()
    f.punch_hole(0, 8 * PAGE)
    t.join()
    assert done == ["range", "end", "bind"]


def test_a_failing_invalidator_still_gets_its_end(files: list[GuestMemfd]) -> None:
    class Broken(Recorder):
        def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
            raise RuntimeError("zap failed")

    rec = Broken()
    f = make(files, 4 * PAGE, rec=rec)
    f.bind(SlotRef(0, 1, 0, 4), 0, owner=VM)
    with pytest.raises(RuntimeError):
        f.punch_hole(0, PAGE)
    assert rec.calls() == [("begin",), ("end",)]
    assert f.unbind(SlotRef(0, 1, 0, 4))  # the lock was released


# -- release -------------------------------------------------------------------------------------
def test_close_releases_every_binding(rec: Recorder) -> None:
    f = GuestMemfd.create(8 * PAGE, MMAP | SHARED, VM, invalidator=rec)
    a, b = SlotRef(0, 1, 0x100, 2), SlotRef(0, 2, 0x800, 3)
    f.bind(a, 0, owner=VM)
    f.bind(b, 5 * PAGE, owner=VM)
    frame = f.get_pfn(b, 0x801)
    rec.probe = lambda: f.released
    f.close()
    # slots lose the file before the zap: faults already fail at begin
    assert rec.events == [("begin", True), ("range", 0, 0x100, 0x102, True),
                          ("range", 0, 0x800, 0x803, True), ("end", True)]
    assert f.released and f.bindings == () and not frame.current()
    refused(errno.EFAULT, f.get_pfn, b, 0x801)
    refused(errno.EFAULT, f.page_view, 0)
    refused(errno.EBADF, f.punch_hole, 0, PAGE)
    assert not f.unbind(a)                     # the slot's later DELETE finds nothing to do
    f.close()                                  # twice is fine
    assert len(rec.events) == 4


def test_close_without_bindings_tells_nobody(rec: Recorder) -> None:
    f = GuestMemfd.create(PAGE, 0, VM, invalidator=rec)
    f.close()
    assert f.released and rec.events == []


def test_the_last_mapping_releases(rec: Recorder) -> None:
    with GuestMemfd.create(4 * PAGE, MMAP | SHARED, VM, invalidator=rec) as f:
        f.bind(SlotRef(0, 1, 0, 4), 0, owner=VM)
        m1, m2 = f.mmap(), f.mmap()
    assert f.closed and not f.released and rec.events == []
    m1.close()
    assert not f.released
    m2.view()[0] = 1
    m2.close()
    assert f.released and rec.calls() == [("begin",), ("range", 0, 0, 4), ("end",)]


def test_a_page_view_kept_past_release_stays_harmless() -> None:
    f = GuestMemfd.create(PAGE, 0, VM)
    view = f.page_view(0)
    view[0] = 9
    f.close()
    assert view[0] == 9  # the window lives as long as the view; no crash
    view.release()
