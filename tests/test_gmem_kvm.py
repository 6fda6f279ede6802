"""Differential test: `kvmem.gmem.GuestMemfd` against real guest_memfd files of this host's KVM.

Every call goes to a real guest_memfd (`KvmVm.create_guest_memfd`, `fallocate(2)` and `mmap(2)`
through ctypes, `KVM_SET_USER_MEMORY_REGION2` for bindings) and to the model; both must accept,
or both refuse with the same errno — across random sizes, flags, offsets and lengths biased
towards every rule: zero, unaligned, negative as signed (given both as a negative int to the
model and as its u64 pattern to the kernel), past the end, huge, 2^63 - 4096, 2^63, 2^64 - 4096.
Where a small file has MMAP | INIT_SHARED, both are also written through their mappings (the
model alternately through its mapping and its direct map) and compared byte for byte after
every call, so a punch must zero exactly what the kernel zeroes.

Limits: allocations that would succeed are kept to 64 pages (both sides really allocate);
mappings are made of files up to 4 GiB or of at least 2^47 bytes (ENOMEM on both sides): the
model's host mapping keeps per-page arrays that a 2^46-byte mapping would make too large;
bindings are at most 4096 pages (KVM allocates per-page slot metadata on creation).
KVMEM_GMEM_SEED=<n> picks another seed (default fixed, reproducible).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from kvmem.errors import KvmError
from kvmem.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd, SlotRef
from kvmem.kvmapi import KVM_MEM_GUEST_MEMFD, Kvm, KvmVm, kvm_available

PAGE = 4096
U64 = (1 << 64) - 1
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
VM = object()
T = TypeVar("T")
SEED = int(os.environ.get("KVMEM_GMEM_SEED", "20260518"))

_why = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(_why is not None, reason=_why or "")]

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
KEEP_SIZE, PUNCH_HOLE = 1, 2


def s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def real_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    if _libc.fallocate(fd, mode, s64(offset), s64(length)) == 0:
        return 0
    return ctypes.get_errno()


def real_mmap_errno(fd: int, size: int) -> int:
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return ctypes.get_errno()
    _libc.munmap(addr, size)
    return 0


def model(fn: Callable[..., object], *args: object, **kw: object) -> int:
    """The model's answer to one call: 0 or the errno it refused with."""
    return answer(fn, *args, **kw)[0]


def answer(fn: Callable[..., T], *args: object, **kw: object) -> tuple[int, T | None]:
    try:
        return 0, fn(*args, **kw)
    except KvmError as e:
        return e.errno or -1, None


@pytest.fixture(scope="module")
def kvm_vm() -> Iterator[KvmVm]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        yield vm


class Gen:
    """Random arguments, biased towards every rule's boundary."""

    SPECIAL_SIZES = (0, 1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 1 << 47, (1 << 63) - PAGE,
                     1 << 63, (1 << 63) + PAGE, (1 << 64) - PAGE, U64, -PAGE, -1, 1 << 62)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.randint(1, 64) * PAGE
        if r < 0.6:
            return self.rng.randint(1, 1 << 18) * PAGE
        if r < 0.7:
            return self.rng.randrange(PAGE, 1 << 63, PAGE)
        if r < 0.9:
            return self.rng.choice(self.SPECIAL_SIZES)
        return self.rng.randrange(0, 1 << 64)

    def flags(self) -> int:
        r = self.rng.random()
        if r < 0.85:
            return self.rng.randrange(4)
        return self.rng.choice((4, 1 << self.rng.randrange(64), 1 << 63, U64, 7, 5))

    def number(self, size: int) -> int:
        """An offset or a length for a file of `size` bytes."""
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return rng.randrange(0, size // PAGE + 1) * PAGE
        if r < 0.5:
            return rng.randint(1, 8) * PAGE
        if r < 0.6:
            return size + rng.randint(0, 8) * PAGE
        if r < 0.7:
            return rng.randrange(0, size + 2 * PAGE) | rng.choice((1, 8, 2048, 4095))
        if r < 0.8:
            v = -rng.randint(1, 8) * PAGE
            return v if rng.random() < 0.5 else v & U64  # both readings of a negative
        if r < 0.9:
            return rng.choice((0, (1 << 63) - PAGE, (1 << 63) - 2 * PAGE, 1 << 63, 1 << 62,
                               (1 << 64) - PAGE, U64, (1 << 63) - 1))
        return rng.randrange(0, 1 << 64)


def small_allocation(size: int, offset: int, length: int) -> int:
    """`length`, shrunk to 64 pages where the allocation would succeed."""
    o, n = s64(offset), s64(length)
    if o >= 0 and n > 64 * PAGE and not (o | n) % PAGE and o + n <= size:
        return 64 * PAGE
    return length


@pytest.fixture
def bounded_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that wrongly accepted a huge allocation would really allocate it (the OOM
    killer ended one such mutant here): refuse, as a divergence, any allocation of the model's
    backing file larger than the 64 pages the generator lets succeed."""
    inner = GuestMemfd._fallocate

    def guarded(self: GuestMemfd, mode: int, offset: int, length: int) -> None:
        if mode == KEEP_SIZE and length > 64 * PAGE:
            raise KvmError(-1, f"model allocates {length:#x} bytes the kernel would not")
        inner(self, mode, offset, length)

    monkeypatch.setattr(GuestMemfd, "_fallocate", guarded)


@pytest.mark.usefixtures("bounded_allocations")
def test_differential_create_punch_allocate_mmap(kvm_vm: KvmVm) -> None:
    rng = random.Random(SEED)
    gen = Gen(rng)
    calls: Counter[str] = Counter()
    outcomes: Counter[tuple[str, int]] = Counter()
    divergences: list[str] = []
    compared_bytes = 0

    def same(what: str, want: int, got: int) -> None:
        calls[what.split("(")[0]] += 1
        outcomes[(what.split("(")[0], want)] += 1
        if want != got:
            divergences.append(f"{what}: kernel {errno.errorcode.get(want, want)}, "
                               f"model {errno.errorcode.get(got, got)}")

    while sum(calls.values()) < 6000:
        size, flags = gen.size(), gen.flags()
        try:
            fd = kvm_vm.create_guest_memfd(size & U64, flags & U64)
            want = 0
        except OSError as e:
            fd, want = -1, e.errno or -1
        got, made = answer(GuestMemfd.create, size, flags, VM)
        same(f"create(size={size:#x}, flags={flags:#x})", want, got)
        if fd < 0 or made is None:
            if fd >= 0:
                os.close(fd)
            if made is not None:
                made.close()
            continue
        f = made
        real_size = s64(size)
        content = (flags & (MMAP | SHARED)) == MMAP | SHARED and real_size <= 64 * PAGE
        real_map = mmap.mmap(fd, real_size) if content else None
        model_map = f.mmap() if content else None
        try:
            for _ in range(rng.randint(5, 40)):
                op = rng.random()
                if op < 0.4:
                    off, ln = gen.number(real_size), gen.number(real_size)
                    same(f"punch(size={real_size:#x}, {off:#x}, {ln:#x})",
                         real_fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, ln),
                         model(f.punch_hole, off, ln))
                elif op < 0.7:
                    off, ln = gen.number(real_size), gen.number(real_size)
                    ln = small_allocation(real_size, off, ln)
                    same(f"allocate(size={real_size:#x}, {off:#x}, {ln:#x})",
                         real_fallocate(fd, KEEP_SIZE, off, ln),
                         model(f.allocate, off, ln))
                elif op < 0.8:
                    if flags & MMAP and (1 << 32) < real_size < (1 << 47):
                        continue  # see the module docstring
                    got, mapping = answer(f.mmap)
                    same(f"mmap(size={real_size:#x}, flags={flags:#x})",
                         real_mmap_errno(fd, real_size), got)
                    if mapping is not None:
                        mapping.close()
                elif real_map is not None and model_map is not None:
                    page = rng.randrange(real_size // PAGE)
                    at = page * PAGE + rng.randrange(PAGE - 64)
                    data = rng.randbytes(rng.randint(1, 64))
                    real_map[at:at + len(data)] = data
                    if rng.random() < 0.5:
                        model_map.view()[at:at + len(data)] = data
                    else:
                        o = at - page * PAGE
                        f.page_view(page)[o:o + len(data)] = data
                if real_map is not None and model_map is not None:
                    if bytes(real_map) != bytes(model_map.view()):
                        divergences.append(f"contents differ after {calls.total()} calls")
                    assert bytes(f.page_view(0)) == real_map[:PAGE]
                    compared_bytes += real_size
        finally:
            if real_map is not None:
                real_map.close()
            if model_map is not None:
                model_map.close()
            os.close(fd)
            f.close()

    print(f"\ngmem differential (seed {SEED}): {sum(calls.values())} calls {dict(calls)}, "
          f"{compared_bytes} bytes compared, {len(divergences)} divergences")
    assert divergences == [], "\n".join(divergences[:20])
    # the generator reached every rule: each errno the kernel can give here was seen
    for call, err in [("create", errno.EINVAL), ("create", 0), ("punch", 0),
                      ("punch", errno.EINVAL), ("punch", errno.EFBIG), ("allocate", 0),
                      ("allocate", errno.EINVAL), ("allocate", errno.EFBIG), ("mmap", 0),
                      ("mmap", errno.ENODEV), ("mmap", errno.ENOMEM)]:
        assert outcomes[(call, err)] >= 5, (call, err, outcomes)
    assert compared_bytes > 1 << 20


def test_model_over_a_real_guest_memfd(kvm_vm: KvmVm) -> None:
    """The KVM engine's use: the model checks, the kernel file holds the pages. Every call the
    model accepts must be accepted by the kernel (else the model raises), and the kernel's
    own mapping must show what the model did."""
    rng = random.Random(SEED + 1)
    size = 32 * PAGE
    fd = kvm_vm.create_guest_memfd(size, MMAP | SHARED)
    f = GuestMemfd.create(size, MMAP | SHARED, VM, backing_fd=fd)
    real = mmap.mmap(os.dup(fd), size)
    mine = f.mmap()
    shadow = bytearray(size)
    gen = Gen(rng)
    for _ in range(600):
        op = rng.random()
        if op < 0.5:
            page = rng.randrange(32)
            data = rng.randbytes(PAGE)
            (mine.view()[page * PAGE:(page + 1) * PAGE] if rng.random() < 0.5
             else f.page_view(page))[:] = data
            shadow[page * PAGE:(page + 1) * PAGE] = data
        else:
            off, ln = gen.number(size), gen.number(size)
            if op < 0.8:
                if model(f.punch_hole, off, ln) == 0:
                    lo, hi = s64(off), min(s64(off) + s64(ln), size)
                    if lo < hi:
                        shadow[lo:hi] = bytes(hi - lo)
            else:
                model(f.allocate, off, small_allocation(size, off, ln))
        assert real[:] == shadow == bytes(mine.view())
    real.close()
    mine.close()
    f.close()  # closes fd: the model owned it


def test_bind_matches_kvm_gmem_bind(kvm_vm: KvmVm) -> None:
    """KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD, for requests that pass the slot
    checks before the binding (each slot id has its own gpa range; offsets aligned and not
    wrapping u64, except a few that check 8 refuses with the same EINVAL): 18c-18e."""
    rng = random.Random(SEED + 2)
    hva = 1 << 40  # unmapped but valid: KVM checks only access_ok
    divergences: list[str] = []
    outcomes: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    calls = 0
    for _ in range(12):
        npages_file = rng.choice((1, 16, 256, 4096))
        size = npages_file * PAGE
        flags = rng.randrange(4)
        fd = kvm_vm.create_guest_memfd(size, flags)
        rec = _NullInvalidator()
        f = GuestMemfd.create(size, flags, VM, invalidator=rec)
        installed: dict[int, tuple[int, int]] = {}
        for _ in range(120):
            slot = rng.randrange(16)
            gpa = slot << 36
            if slot in installed:
                kvm_vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, gpa, 0, hva, 0, fd)
                assert f.unbind(SlotRef(0, slot, gpa >> 12, installed.pop(slot)[1]))
                continue
            npages = rng.choice((1, 2, rng.randint(1, npages_file), npages_file,
                                 npages_file + 1, rng.randint(1, 4096)))
            r = rng.random()
            if r < 0.7:
                offset = rng.randrange(0, npages_file + 2) * PAGE
            elif r < 0.8:
                offset = rng.choice(((1 << 63) - PAGE, (1 << 63) - 2 * PAGE, 1 << 63,
                                     (1 << 64) - (npages + 1) * PAGE, (1 << 62)))
            elif r < 0.9:
                offset = rng.randrange(0, size) | 8  # unaligned: check 8, EINVAL
            else:
                offset = rng.randrange(0, 1 << 52) * PAGE
            if offset + npages * PAGE > U64:
                continue  # wraps u64: check 8's, not the binding's
            try:
                kvm_vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, gpa, npages * PAGE,
                                               hva, offset, fd)
                want = 0
                installed[slot] = (offset, npages)
            except OSError as e:
                want = e.errno or -1
            ref = SlotRef(0, slot, gpa >> 12, npages)
            try:
                f.bind(ref, offset, owner=VM)
                got, why = 0, "bound"
            except KvmError as e:
                got = e.errno or -1
                why = next(w for w in ("overlap", "end", "negative", "multiple", "")
                           if w in e.message)
            calls += 1
            outcomes[want] += 1
            reasons[why] += 1
            if want != got:
                divergences.append(f"bind(file {size:#x}, slot {slot}, offset {offset:#x}, "
                                   f"{npages} pages): kernel {want}, model {got}")
        # another VM's file, then a closed fd
        with Kvm() as kvm2, kvm2.create_vm() as vm2:
            other = vm2.create_guest_memfd(size, 0)
            try:
                kvm_vm.set_user_memory_region2(20, KVM_MEM_GUEST_MEMFD, 20 << 36, PAGE, hva,
                                               0, other)
                want = 0
            except OSError as e:
                want = e.errno or -1
            os.close(other)
        got = model(f.bind, SlotRef(0, 20, (20 << 36) >> 12, 1), 0, owner=object())
        calls += 1
        if (want, got) != (errno.EINVAL, errno.EINVAL):
            divergences.append(f"other VM's file: kernel {want}, model {got}")
        for slot in list(installed):
            kvm_vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, slot << 36, 0, hva, 0, fd)
            f.unbind(SlotRef(0, slot, (slot << 36) >> 12, installed.pop(slot)[1]))
        os.close(fd)  # asked at once: a later fd could take the number again
        try:
            kvm_vm.set_user_memory_region2(21, KVM_MEM_GUEST_MEMFD, 21 << 36, PAGE, hva, 0, fd)
            want = 0
        except OSError as e:
            want = e.errno or -1
        keep = f.mmap() if flags & MMAP else None  # a closed fd even while the file lives
        f.close()
        got = model(f.bind, SlotRef(0, 21, (21 << 36) >> 12, 1), 0, owner=VM)
        calls += 1
        if want != got:
            divergences.append(f"closed fd: kernel {want}, model {got}")
        if keep is not None:
            keep.close()
    print(f"\ngmem bind differential: {calls} calls, kernel {dict(outcomes)}, model's "
          f"reasons {dict(reasons)}, {len(divergences)} divergences")
    assert divergences == [], "\n".join(divergences[:20])
    for why in ("bound", "overlap", "end", "negative", "multiple"):
        assert reasons[why] >= 5, reasons


def test_bind_offset_wrap_matches_kernel(kvm_vm: KvmVm) -> None:
    """KVM's `offset + size > i_size` is an loff_t sum: past 2^63 it wraps and the binding is
    accepted although it lies past the end of the file. The model copies that."""
    fd = kvm_vm.create_guest_memfd(1 << 20, 0)
    f = GuestMemfd.create(1 << 20, 0, VM, invalidator=_NullInvalidator())
    try:
        for slot, offset, npages in [(30, (1 << 63) - PAGE, 2), (31, (1 << 63) - 2 * PAGE, 2),
                                     (32, (1 << 63) - 2 * PAGE, 1)]:
            try:
                kvm_vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, slot << 36,
                                               npages * PAGE, 1 << 40, offset, fd)
                want = 0
                kvm_vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, slot << 36, 0,
                                               1 << 40, offset, fd)
            except OSError as e:
                want = e.errno or -1
            ref = SlotRef(0, slot, (slot << 36) >> 12, npages)
            assert model(f.bind, ref, offset, owner=VM) == want
            f.unbind(ref)
        assert want == errno.EINVAL  # the last one does not wrap: past the end, refused
    finally:
        os.close(fd)
        f.close()


def test_real_guest_memfd_refuses_private_mappings(kvm_vm: KvmVm) -> None:
    """Why the model's mmap has no MAP_PRIVATE: the kernel refuses it (EINVAL) for MMAP files."""
    fd = kvm_vm.create_guest_memfd(PAGE, MMAP | SHARED)
    try:
        addr = _libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        assert addr in (None, ctypes.c_void_p(-1).value)
        assert ctypes.get_errno() == errno.EINVAL
    finally:
        os.close(fd)


class _NullInvalidator:
    def gmem_invalidate_begin(self) -> None:
        pass

    def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
        pass

    def gmem_invalidate_end(self) -> None:
        pass
