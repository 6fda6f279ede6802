"""Host memory (`kvmem.host`) and the invalidations it reports (kvm-semantics §5).

A VMM relies on: mappings at real, page-aligned hvas whose bytes it can read and write;
`discard`, `remap`, `protect` and `close` each reported to every registered notifier as
`invalidate_range_start(start, end)` *before* the change and `invalidate_range_end` after it,
with exactly the hva range changed; refused requests change nothing and report nothing.
`vm.hva_to_gfn_ranges` is the notifier's walk from an hva range to the gfns of every slot
(in every address space) that maps it.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmem
from kvmem import HostMemory, KvmError, Vm
from kvmem.host import PROT_NONE, PROT_READ, PROT_RW

PAGE = 4096
AS1 = 1 << 16
KINDS = ["anonymous", "memfd", "file"]


class Recorder:
    """A notifier subscriber that records events and what the memory looked like then."""

    def __init__(self, probe: Callable[[], object] | None = None) -> None:
        self.events: list[tuple[str, int, int, object]] = []
        self.probe = probe

    def _seen(self) -> object:
        return self.probe() if self.probe is not None else None

    def invalidate_range_start(self, start: int, end: int) -> None:
        self.events.append(("start", start, end, self._seen()))

    def invalidate_range_end(self, start: int, end: int) -> None:
        self.events.append(("end", start, end, self._seen()))

    def ranges(self, mem: HostMemory | None = None) -> list[tuple[str, int, int]]:
        """Events (kind, start, end); with `mem`, only those inside its mapping."""
        return [(k, s, e) for k, s, e, _ in self.events
                if mem is None or (mem.hva <= s and e <= mem.hva + mem.size)]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    kvmem.host.notifiers.register(rec)
    yield rec
    kvmem.host.notifiers.unregister(rec)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[str, int], HostMemory]]:
    made: list[HostMemory] = []

    def make_(kind: str, npages: int) -> HostMemory:
        if kind == "anonymous":
            m = HostMemory.anonymous(npages * PAGE)
        elif kind == "memfd":
            m = HostMemory.memfd(npages * PAGE)
        else:
            m = HostMemory.file(tmp_path / f"mem{len(made)}", npages * PAGE)
        made.append(m)
        return m

    yield make_
    for m in made:
        m.close()


def fill(mem: HostMemory) -> bytes:
    data = bytes((i * 7 + 3) & 0xFF for i in range(mem.size))
    mem.view()[:] = data
    return data


# ------------------------------------------------------------------------------------------
# mappings


@pytest.mark.parametrize("kind", KINDS)
def test_mapping_basics(make: Callable[[str, int], HostMemory], kind: str) -> None:
    mem = make(kind, 4)
    assert mem.kind == kind
    assert mem.hva % PAGE == 0 and mem.hva > 0
    assert mem.size == len(mem) == 4 * PAGE
    assert not mem.closed
    view = mem.view()
    assert len(view) == mem.size and not view.readonly
    assert bytes(view) == bytes(mem.size)  # fresh memory is zero
    data = fill(mem)
    assert bytes(mem.view()) == data
    vm = Vm()
    vm.set_memory_region(0, 0, 0, mem.size, mem.hva)
    assert vm.read(0, mem.size) == data  # the hva is the real address of those bytes


def test_distinct_mappings_do_not_overlap(make: Callable[[str, int], HostMemory]) -> None:
    mems = [make(k, 3) for k in KINDS]
    spans = sorted((m.hva, m.hva + m.size) for m in mems)
    assert all(a_end <= b for (_, a_end), (b, _) in itertools.pairwise(spans))


def test_file_mapping_is_the_file(tmp_path: Path) -> None:
    path = tmp_path / "guest.img"
    path.write_bytes(b"boot" + bytes(100))
    with HostMemory.file(path, 2 * PAGE) as mem:
        assert mem.path == str(path)
        assert bytes(mem.view()[:4]) == b"boot"
        assert os.path.getsize(path) == 2 * PAGE  # extended to the mapping size
        mem.view()[PAGE:PAGE + 3] = b"abc"
        with open(path, "rb") as f:
            f.seek(PAGE)
            assert f.read(3) == b"abc"
    assert mem.closed


def test_file_longer_than_the_mapping_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(b"x" * (3 * PAGE))
    with HostMemory.file(path, PAGE) as mem:
        assert mem.size == PAGE
    assert os.path.getsize(path) == 3 * PAGE


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, -4096])
def test_bad_sizes_are_einval(size: int) -> None:
    with pytest.raises(KvmError) as info:
        HostMemory.anonymous(size)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        HostMemory.memfd(size)


@pytest.mark.parametrize("size", [0, 4097, -4096])
def test_refused_file_size_leaves_the_file_alone(tmp_path: Path, size: int) -> None:
    existing = tmp_path / "small.img"
    existing.write_bytes(b"abc")
    missing = tmp_path / "missing.img"
    for path in (existing, missing):
        with pytest.raises(KvmError) as info:
            HostMemory.file(path, size)
        assert info.value.errno == errno.EINVAL
    assert existing.read_bytes() == b"abc"
    assert not missing.exists()


@pytest.mark.parametrize("size", [4096.0, "4096", None, True])
def test_non_int_size_is_type_error(size: object) -> None:
    with pytest.raises(TypeError):
        HostMemory.anonymous(size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# changes and their invalidations


@pytest.mark.parametrize("kind", KINDS)
def test_discard_zeroes_and_notifies(make: Callable[[str, int], HostMemory],
                                     recorder: Recorder, kind: str) -> None:
    mem = make(kind, 8)
    data = fill(mem)
    view = mem.view()
    recorder.probe = lambda: view[2 * PAGE + 1]
    mem.discard(2 * PAGE, 3 * PAGE)
    start, end = mem.hva + 2 * PAGE, mem.hva + 5 * PAGE
    assert recorder.ranges(mem) == [("start", start, end), ("end", start, end)]
    seen = [e[3] for e in recorder.events if e[1] == start]
    assert seen == [data[2 * PAGE + 1], 0]  # start: still there; end: gone
    assert bytes(mem.view()) == data[:2 * PAGE] + bytes(3 * PAGE) + data[5 * PAGE:]


def test_discarded_file_pages_are_zero_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    with HostMemory.file(path, 4 * PAGE) as mem:
        fill(mem)
        mem.discard(PAGE, PAGE)
        with open(path, "rb") as f:
            f.seek(PAGE)
            assert f.read(PAGE) == bytes(PAGE)


@pytest.mark.parametrize("kind", KINDS)
def test_remap_notifies_and_keeps_shared_content(make: Callable[[str, int], HostMemory],
                                                 recorder: Recorder, kind: str) -> None:
    mem = make(kind, 8)
    data = fill(mem)
    hva = mem.hva
    mem.remap(PAGE, 2 * PAGE)
    assert mem.hva == hva
    start, end = hva + PAGE, hva + 3 * PAGE
    assert recorder.ranges(mem) == [("start", start, end), ("end", start, end)]
    remapped = bytes(2 * PAGE) if kind == "anonymous" else data[PAGE:3 * PAGE]
    assert bytes(mem.view()) == data[:PAGE] + remapped + data[3 * PAGE:]
    mem.view()[PAGE] = 0xAB  # the new pages are writable
    assert mem.view()[PAGE] == 0xAB
    assert mem.protection(PAGE) == PROT_RW


@pytest.mark.parametrize("kind", KINDS)
def test_protect_notifies_and_is_reflected(make: Callable[[str, int], HostMemory],
                                           recorder: Recorder, kind: str) -> None:
    mem = make(kind, 8)
    data = fill(mem)
    recorder.probe = lambda: mem.protection(3 * PAGE)
    mem.protect(3 * PAGE, 2 * PAGE, PROT_READ)
    start, end = mem.hva + 3 * PAGE, mem.hva + 5 * PAGE
    assert recorder.ranges(mem) == [("start", start, end), ("end", start, end)]
    assert [e[3] for e in recorder.events] == [PROT_RW, PROT_READ]
    assert [mem.protection(p * PAGE) for p in range(8)] == [
        PROT_RW, PROT_RW, PROT_RW, PROT_READ, PROT_READ, PROT_RW, PROT_RW, PROT_RW]
    assert mem.protection(5 * PAGE - 1) == PROT_READ
    assert bytes(mem.view()[3 * PAGE:5 * PAGE]) == data[3 * PAGE:5 * PAGE]  # readable
    mem.protect(4 * PAGE, PAGE, PROT_NONE)
    assert [mem.protection(p * PAGE) for p in (3, 4, 5)] == [PROT_READ, PROT_NONE, PROT_RW]
    mem.protect(0, mem.size, PROT_RW)
    assert all(mem.protection(p * PAGE) == PROT_RW for p in range(8))
    assert bytes(mem.view()) == data
    assert len(recorder.ranges(mem)) == 6


def test_protection_beyond_the_mapping_is_einval(make: Callable[[str, int], HostMemory]) -> None:
    mem = make("anonymous", 2)
    for off in (2 * PAGE, -1):
        with pytest.raises(KvmError) as info:
            mem.protection(off)
        assert info.value.errno == errno.EINVAL


def test_every_listener_sees_every_mapping(make: Callable[[str, int], HostMemory],
                                           recorder: Recorder) -> None:
    a, b = make("anonymous", 2), make("memfd", 2)
    second = Recorder()
    kvmem.host.notifiers.register(second)
    try:
        a.discard(0, PAGE)
        b.discard(PAGE, PAGE)
    finally:
        kvmem.host.notifiers.unregister(second)
    a.discard(PAGE, PAGE)
    expect = [("start", a.hva, a.hva + PAGE), ("end", a.hva, a.hva + PAGE),
              ("start", b.hva + PAGE, b.hva + 2 * PAGE), ("end", b.hva + PAGE, b.hva + 2 * PAGE)]
    assert second.ranges(a) + second.ranges(b) == expect
    assert len(second.events) == 4  # unregistered: the last discard was not seen
    assert len(recorder.ranges(a)) == 4


BAD_RANGES: list[tuple[object, object, type[Exception], int | None]] = [
    (1, PAGE, KvmError, errno.EINVAL),  # unaligned offset
    (0, 100, KvmError, errno.EINVAL),  # unaligned length
    (0, 0, KvmError, errno.EINVAL),  # empty
    (-PAGE, PAGE, KvmError, errno.EINVAL),  # negative offset
    (0, -PAGE, KvmError, errno.EINVAL),  # negative length
    (4 * PAGE, PAGE, KvmError, errno.EINVAL),  # starts at the end
    (3 * PAGE, 2 * PAGE, KvmError, errno.EINVAL),  # runs past the end
    (0, 5 * PAGE, KvmError, errno.EINVAL),
    (0.0, PAGE, TypeError, None),
    (0, "4096", TypeError, None),
    (None, PAGE, TypeError, None),
    (True, PAGE, TypeError, None),
]


@pytest.mark.parametrize("op", ["discard", "remap", "protect"])
@pytest.mark.parametrize(("offset", "length", "exc", "err"), BAD_RANGES)
def test_bad_ranges_are_refused_without_events(
        make: Callable[[str, int], HostMemory], recorder: Recorder, op: str, offset: object,
        length: object, exc: type[Exception], err: int | None) -> None:
    mem = make("memfd", 4)
    data = fill(mem)
    args: tuple[object, ...] = (offset, length) + ((PROT_READ,) if op == "protect" else ())
    with pytest.raises(exc) as info:
        getattr(mem, op)(*args)
    if err is not None:  # the rows with an errno all expect a KvmError
        assert isinstance(info.value, KvmError) and info.value.errno == err
    assert recorder.ranges(mem) == []
    assert bytes(mem.view()) == data
    assert all(mem.protection(p * PAGE) == PROT_RW for p in range(4))


@pytest.mark.parametrize("prot", [PROT_READ | 4, 2, 8, -1])
def test_bad_protection_is_einval_without_events(make: Callable[[str, int], HostMemory],
                                                 recorder: Recorder, prot: int) -> None:
    mem = make("anonymous", 2)
    with pytest.raises(KvmError) as info:
        mem.protect(0, PAGE, prot)
    assert info.value.errno == errno.EINVAL
    assert recorder.ranges(mem) == []
    assert mem.protection(0) == PROT_RW


@pytest.mark.parametrize("kind", KINDS)
def test_close_notifies_whole_range_then_everything_is_ebadf(
        make: Callable[[str, int], HostMemory], recorder: Recorder, kind: str) -> None:
    mem = make(kind, 4)
    hva, size = mem.hva, mem.size
    recorder.probe = lambda: mem.closed
    mem.close()
    assert recorder.ranges(mem) == [("start", hva, hva + size), ("end", hva, hva + size)]
    assert [e[3] for e in recorder.events] == [False, True]
    assert mem.closed
    assert "closed" in repr(mem)
    for op, args in (("discard", (0, PAGE)), ("remap", (0, PAGE)),
                     ("protect", (0, PAGE, PROT_READ)), ("view", ())):
        with pytest.raises(KvmError) as info:
            getattr(mem, op)(*args)
        assert info.value.errno == errno.EBADF, op
    mem.close()  # idempotent, and no second invalidation
    assert len(recorder.events) == 2


def test_memfd_close_releases_the_descriptor() -> None:
    mem = HostMemory.memfd(PAGE)
    fd = mem.fd
    assert fd is not None
    os.fstat(fd)
    mem.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def test_context_manager_closes(recorder: Recorder) -> None:
    with HostMemory.anonymous(PAGE) as mem:
        hva = mem.hva
    assert mem.closed
    assert recorder.ranges() == [("start", hva, hva + PAGE), ("end", hva, hva + PAGE)]


# ------------------------------------------------------------------------------------------
# hva -> gfn ranges


def ranges(vm: Vm, start: int, end: int) -> set[tuple[int, int, int, int]]:
    return {(s.as_id, s.id, lo, hi) for s, lo, hi in vm.hva_to_gfn_ranges(start, end)}


@pytest.fixture
def aliased(make: Callable[[str, int], HostMemory]) -> tuple[Vm, HostMemory, HostMemory]:
    # `other` is mapped wherever mmap puts it, perhaps right beside `mem`: its slot covers
    # only its middle pages, so no edge of `mem` can meet a slot of `other`
    mem, other = make("memfd", 16), make("anonymous", 12)
    vm = Vm()
    vm.set_memory_region(0, 0, 0x100000, 8 * PAGE, mem.hva)  # pages 0..8
    vm.set_memory_region(1, 0, 0x200000, 8 * PAGE, mem.hva + 4 * PAGE)  # pages 4..12, alias
    vm.set_memory_region(AS1 | 0, 0, 0x300000, 4 * PAGE, mem.hva + 2 * PAGE)  # pages 2..6
    vm.set_memory_region(2, 0, 0x400000, 4 * PAGE, other.hva + 4 * PAGE)
    return vm, mem, other


def test_hva_range_reaches_every_alias_in_every_address_space(
        aliased: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, mem, _ = aliased
    h = mem.hva
    assert ranges(vm, h + 3 * PAGE + 5, h + 6 * PAGE - 1) == {
        (0, 0, 0x103, 0x106), (0, 1, 0x200, 0x202), (1, 0, 0x301, 0x304)}
    assert ranges(vm, h, h + mem.size) == {
        (0, 0, 0x100, 0x108), (0, 1, 0x200, 0x208), (1, 0, 0x300, 0x304)}


def test_hva_range_edges(aliased: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, mem, other = aliased
    h = mem.hva
    assert ranges(vm, h - PAGE, h) == set()  # ends where the first slot starts
    assert ranges(vm, h + 12 * PAGE, h + 16 * PAGE) == set()  # past every slot
    assert ranges(vm, h + 11 * PAGE, h + 12 * PAGE) == {(0, 1, 0x207, 0x208)}
    assert ranges(vm, h + 7 * PAGE + 100, h + 7 * PAGE + 101) == {
        (0, 0, 0x107, 0x108), (0, 1, 0x203, 0x204)}
    assert ranges(vm, h + 8 * PAGE - 1, h + 8 * PAGE + 1) == {
        (0, 0, 0x107, 0x108), (0, 1, 0x203, 0x205)}
    assert ranges(vm, other.hva + 5 * PAGE, other.hva + 6 * PAGE) == {(0, 2, 0x401, 0x402)}
    assert ranges(vm, other.hva, other.hva + 4 * PAGE) == set()  # its edges are no slot's


def test_hva_ranges_follow_slot_changes(aliased: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, mem, _ = aliased
    h = mem.hva
    vm.set_memory_region(1, 0, 0, 0, 0)
    vm.set_memory_region(0, 0, 0x500000, 8 * PAGE, h)  # MOVE
    assert ranges(vm, h + 5 * PAGE, h + 6 * PAGE) == {(0, 0, 0x505, 0x506), (1, 0, 0x303, 0x304)}


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 12), st.integers(1, 6)),
                      max_size=6),
       start=st.integers(-2 * PAGE, 20 * PAGE), length=st.integers(1, 10 * PAGE))
def test_hva_ranges_match_a_page_walk(slots: list[tuple[int, int, int]], start: int,
                                      length: int) -> None:
    base = 0x7F00_0000_0000  # hvas need not be mapped for the walk
    vm = Vm()
    for i, (as_id, hpage, npages) in enumerate(slots):
        vm.set_memory_region((as_id << 16) | i, 0, i * 0x100000, npages * PAGE,
                             base + hpage * PAGE)
    lo, hi = base + start, base + start + length
    expect = set()
    for i, (as_id, hpage, npages) in enumerate(slots):
        hit = [p for p in range(npages)
               if base + (hpage + p) * PAGE < hi and lo < base + (hpage + p + 1) * PAGE]
        if hit:
            gfn0 = i * 0x100
            expect.add((as_id, i, gfn0 + hit[0], gfn0 + hit[-1] + 1))
    assert ranges(vm, lo, hi) == expect
