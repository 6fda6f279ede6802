"""Differential test: guest_memfd slots on a `kvmem.Vm` against this host's KVM, call by call.

Every call goes to a real KVM VM (`kvmem.kvmapi`) and to a `kvmem.Vm` made like the host
(`hostcaps.vm_like_host`): `KVM_CREATE_GUEST_MEMFD` / `vm.create_guest_memfd`,
`KVM_SET_USER_MEMORY_REGION2` / `vm.set_memory_region2` (and the V1 ioctl / `set_memory_region`,
which must refuse the flag and may delete a guest_memfd slot), `fallocate(PUNCH_HOLE)` /
`punch_hole`, and closing a file. Both must accept, or both refuse with the same errno. The file
a request names is drawn from: a live file of this VM (both sides), none (the kernel gets fd
0xffffffff, the model None or a closed file: EBADF), a plain memfd (the model: `HostMemory.memfd`:
EINVAL) and another VM's guest_memfd (EINVAL); offsets and sizes are biased towards every rule
(unaligned, wrapping u64, negative as loff_t, past the end, exactly the end, overlapping a bound
range). After every call the model's slots must equal a shadow of what KVM accepted (file and
offset included), every live model file's bindings must equal the shadow's guest_memfd slots on
it, and the contents of small MMAP | INIT_SHARED files (mapped on both sides) must agree.

Coverage is checked at the end: each rule was hit as the *only* broken rule several times (the
tags come from `region_tags`, written from the kernel's text, not from kvmem), and every call's
accept and refuse outcomes were seen. KVMEM_GMEM_DIFF_SEED=<n> picks another seed,
KVMEM_GMEM_DIFF_CALLS=<n> another length (default 5000 calls, about 10 s here).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from forked import outcomes_in_child

import kvmem
from kvmem import HostMemory, hostcaps, kvmapi
from kvmem.gmem import GmemMapping, GuestMemfd
from kvmem.hostcaps import HostLimits
from kvmem.kvmapi import Kvm, KvmVm
from kvmem.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

_REASON = kvmapi.kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

PAGE = 4096
U64 = (1 << 64) - 1
GMEM, LOG, RO = KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
MMAP, SHARED = 1, 2
MAX_NR_PAGES = (1 << 31) - 1
NO_FD = 0xFFFF_FFFF  # fget fails: EBADF
HVA = 1 << 40  # valid user addresses nothing is mapped at (KVM checks only access_ok)
SEED = int(os.environ.get("KVMEM_GMEM_DIFF_SEED", "20260601"))
CALLS = int(os.environ.get("KVMEM_GMEM_DIFF_CALLS", "5000"))
MAX_LIVE_FILES = 6

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
KEEP_SIZE, PUNCH_HOLE = 1, 2


def s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def _name(err: int) -> str:
    return "OK" if err == 0 else errno.errorcode.get(err, str(err))


@dataclass
class FilePair:
    """One guest_memfd on both sides; `index` names it in the shadow."""

    index: int
    fd: int
    model: GuestMemfd
    size: int
    flags: int
    real_map: mmap.mmap | None = None
    model_map: GmemMapping | None = None
    open: bool = True


@dataclass(frozen=True)
class Shadow:
    """A slot as KVM accepted it; `file` is the FilePair index of a guest_memfd slot."""

    slot: int
    flags: int
    base_gfn: int
    npages: int
    hva: int
    file: int | None = None
    offset: int = 0


@dataclass
class Request:
    """One REGION(2) call: `v1` for KVM_SET_USER_MEMORY_REGION; `kind` says which file the
    request names: "live" (the FilePair `pair`), "none", "memfd" or "foreign"."""

    v1: bool
    slot: int
    flags: int
    gpa: int
    size: int
    hva: int
    kind: str = "none"
    pair: FilePair | None = None
    offset: int = 0
    model_none: bool = True  # "none": None on the model side, else a closed file

    def describe(self) -> str:
        call = "set_memory_region" if self.v1 else "set_memory_region2"
        file = self.kind if self.pair is None else f"file#{self.pair.index}"
        gmem = "" if self.v1 else f", {file}, offset={self.offset:#x}"
        return (f"{call}(slot={self.slot:#x}, flags={self.flags:#x}, gpa={self.gpa:#x}, "
                f"size={self.size:#x}, hva={self.hva:#x}{gmem})")


def region_tags(limits: HostLimits, shadow: dict[int, Shadow], files: dict[int, FilePair],
                r: Request) -> list[str]:
    """Which rules of §1.3 / §8.3 the request breaks, written from the kernel's text (not from
    kvmem) and used only to measure coverage: a request breaking exactly one rule tests that
    rule whatever the order of the checks."""
    as_id, sid = r.slot >> 16, r.slot & 0xFFFF
    gm = bool(r.flags & GMEM) and not r.v1
    tags = []
    if r.v1 and r.flags & ~(LOG | RO):
        tags.append("v1-flags")
    if sid >= limits.max_slots:
        tags.append("slot-id")
    allowed = GMEM if gm else LOG | RO | GMEM
    if not r.v1 and r.flags & ~allowed:
        tags.append("flags")
    if r.size % PAGE or r.gpa % PAGE or r.hva % PAGE:
        tags.append("unaligned")
    if r.hva + r.size > limits.user_va_end:
        tags.append("hva-range")
    if gm and r.offset % PAGE:
        tags.append("offset-unaligned")
    if gm and r.offset + r.size > U64:
        tags.append("offset-wrap")
    if as_id >= limits.address_spaces:
        tags.append("as-id")
    if r.gpa + r.size > U64 + 1:
        tags.append("gpa-wrap")
    if r.size // PAGE > MAX_NR_PAGES:
        tags.append("too-many-pages")
    if tags:
        return tags
    old = shadow.get(r.slot)
    if r.size == 0:
        return [] if old is not None else ["delete-missing"]
    if old is not None:
        if gm:
            tags.append("gmem-existing")
        if r.hva != old.hva or r.size // PAGE != old.npages or (r.flags ^ old.flags) & RO:
            tags.append("changed")
        if old.flags & GMEM and not r.flags & GMEM:
            tags.append("gmem-drop")
        if tags or r.gpa // PAGE == old.base_gfn:
            return tags
    lo, hi = r.gpa // PAGE, (r.gpa + r.size) // PAGE
    if any(s.slot >> 16 == as_id and s.slot != r.slot and s.base_gfn < hi and lo < s.base_gfn
           + s.npages for s in shadow.values()):
        tags.append("overlap")
    if gm:
        if r.kind == "none":
            tags.append("ebadf")
        elif r.kind == "memfd":
            tags.append("not-gmem")
        elif r.kind == "foreign":
            tags.append("other-vm")
        else:
            assert r.pair is not None
            if not r.pair.open:
                tags.append("ebadf")
            elif s64(r.offset) < 0:
                tags.append("offset-negative")
            elif s64(r.offset + r.size) > r.pair.size:  # loff_t sum: may wrap and pass
                tags.append("past-eof")
            else:
                first, n = r.offset // PAGE, r.size // PAGE
                if any(s.file == r.pair.index and s.slot != r.slot
                       and s.offset // PAGE < first + n and first < s.offset // PAGE + s.npages
                       for s in shadow.values()):
                    tags.append("bind-overlap")
    if hi - 1 > limits.max_gfn:
        tags.append("max-gfn")
    return tags


SOLE_TAGS = ("v1-flags", "flags", "unaligned", "offset-unaligned", "offset-wrap",
             "delete-missing", "gmem-existing", "gmem-drop", "overlap", "ebadf", "not-gmem",
             "other-vm", "offset-negative", "past-eof", "bind-overlap", "max-gfn", "as-id",
             "hva-range")


@dataclass
class World:
    """The two VMs, their files, and everything outside them the requests may name."""

    limits: HostLimits
    kvm: Kvm
    kvm_vm: KvmVm
    model: kvmem.Vm
    foreign_fd: int
    foreign: GuestMemfd
    memfd_fd: int
    memfd: HostMemory
    closed: GuestMemfd
    rng: random.Random
    files: dict[int, FilePair] = field(default_factory=dict)
    shadow: dict[int, Shadow] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    next_index: int = 0

    def both(self, what: str, call: str, on_kvm: Callable[[], object],
             on_model: Callable[[], object]) -> tuple[int, tuple[object, object]]:
        try:
            k_result, k_err = on_kvm(), 0
        except OSError as e:
            k_result, k_err = None, e.errno or -1
        try:
            on_model_result, m_err, m_msg = on_model(), 0, ""
        except kvmem.KvmError as e:
            on_model_result, m_err, m_msg = None, e.errno or -1, str(e)
        self.stats[f"{what}:{_name(k_err)}"] += 1
        self.stats["calls"] += 1
        self.history.append(f"{call} -> {_name(k_err)}")
        if k_err != m_err:
            recent = "\n  ".join(self.history[-30:])
            raise AssertionError(f"{call}: KVM says {_name(k_err)}, kvmem says {_name(m_err)} "
                                 f"{m_msg}\nlast calls:\n  {recent}")
        return k_err, (k_result, on_model_result)

    # -- files ------------------------------------------------------------------------------
    def live(self) -> list[FilePair]:
        return [p for p in self.files.values() if p.open]

    def create_file(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.8:
            size = rng.choice((1, 2, 4, 8, 16, 32, 64, rng.randint(1, 64), 256)) * PAGE
        else:
            size = rng.choice((0, PAGE + 1, PAGE - 1, (1 << 63), U64 + 1 - PAGE, U64))
        flags = rng.randrange(4) if rng.random() < 0.9 else rng.choice((4, 8, 1 << 63, 5))
        call = f"create_guest_memfd(size={size:#x}, flags={flags:#x})"
        err, results = self.both("create", call,
                                 lambda: self.kvm_vm.create_guest_memfd(size, flags),
                                 lambda: self.model.create_guest_memfd(size, flags))
        if err:
            return
        fd, made = results
        assert isinstance(fd, int) and isinstance(made, GuestMemfd)
        pair = FilePair(self.next_index, fd, made, size, flags)
        self.next_index += 1
        if flags & (MMAP | SHARED) == MMAP | SHARED and size <= 64 * PAGE:
            pair.real_map = mmap.mmap(fd, size)
            pair.model_map = made.mmap()
        self.files[pair.index] = pair
        while len(self.live()) > MAX_LIVE_FILES:
            self.close_file(self.live()[0])

    def close_file(self, pair: FilePair) -> None:
        """Close the fd and any mapping on both sides: both release the file, so its slots
        stay installed with no binding."""
        if pair.real_map is not None and pair.model_map is not None:
            pair.real_map.close()
            pair.model_map.close()
        os.close(pair.fd)
        pair.model.close()
        pair.open = False
        self.stats["close"] += 1
        self.history.append(f"close(file#{pair.index})")
        assert pair.model.released and pair.model.bindings == ()

    def punch(self, pair: FilePair) -> None:
        off, ln = self.number(pair.size), self.number(pair.size)
        call = f"punch(file#{pair.index} of {pair.size:#x}, {off:#x}, {ln:#x})"

        def real() -> None:
            if _libc.fallocate(pair.fd, PUNCH_HOLE | KEEP_SIZE, s64(off), s64(ln)) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")

        self.both("punch", call, real, lambda: pair.model.punch_hole(off, ln))
        self.check_contents(pair)

    def scribble(self, pair: FilePair) -> None:
        assert pair.real_map is not None and pair.model_map is not None
        at = self.rng.randrange(pair.size - 64)
        data = self.rng.randbytes(self.rng.randint(1, 64))
        pair.real_map[at:at + len(data)] = data
        pair.model_map.view()[at:at + len(data)] = data
        self.stats["scribble"] += 1

    def check_contents(self, pair: FilePair) -> None:
        if pair.real_map is not None and pair.model_map is not None:
            assert bytes(pair.real_map) == bytes(pair.model_map.view()), (
                f"contents of file#{pair.index} differ after {self.history[-1]}")
            self.stats["contents compared"] += 1

    def number(self, size: int) -> int:
        """An offset or a length for a file of `size` bytes (as the kernel's u64)."""
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return rng.randrange(0, size // PAGE + 1) * PAGE
        if r < 0.55:
            return rng.randint(1, 8) * PAGE
        if r < 0.65:
            return size + rng.randint(0, 4) * PAGE
        if r < 0.75:
            return rng.randrange(0, size + 2 * PAGE) | rng.choice((1, 8, 2048, 4095))
        if r < 0.85:
            return (-rng.randint(1, 8) * PAGE) & U64
        return rng.choice(((1 << 63) - PAGE, (1 << 63) - 2 * PAGE, 1 << 63, 1 << 62,
                           U64 + 1 - PAGE, U64, (1 << 63) - 1))

    # -- slots -------------------------------------------------------------------------------
    def gpa(self, sid: int) -> int:
        """Slots crowd into eight 1 MiB windows, so overlaps are common."""
        rng = self.rng
        if rng.random() < 0.03:
            return rng.choice(((self.limits.max_gfn + 1) * PAGE, self.limits.max_gfn * PAGE,
                               U64 + 1 - PAGE, rng.randrange(0, 1 << 20)))
        return (rng.randrange(8) << 28) + rng.randrange(0, 256) * PAGE

    def region(self) -> Request:
        rng = self.rng
        live = self.live()
        old = rng.choice(list(self.shadow.values())) if self.shadow and rng.random() < 0.35 \
            else None
        if old is not None:
            r = Request(rng.random() < 0.3, old.slot, old.flags, old.base_gfn * PAGE,
                        old.npages * PAGE, old.hva)
            if old.file is not None:
                r.kind, r.pair, r.offset = "live", self.files[old.file], old.offset
            what = rng.random()
            if what < 0.4:
                r.size = 0  # delete
                r.hva = rng.choice((r.hva, 0, HVA + 8, 1 << 63)) if rng.random() < 0.2 else r.hva
                if rng.random() < 0.15:
                    r.offset = rng.choice((1, PAGE, U64 + 1 - PAGE))
            elif what < 0.55:
                r.gpa = self.gpa(r.slot & 0xFFFF)  # MOVE
            elif what < 0.75:
                r.flags ^= rng.choice((LOG, GMEM, RO, GMEM | LOG))
            elif what < 0.85:
                r.size += PAGE
            # else: identical
        else:
            sid = rng.randrange(12) if rng.random() < 0.97 else rng.choice(
                (self.limits.max_slots, 1 << 16 | 1, 0xFFFF))
            npages = rng.choice((1, 2, 4, 8, 16, 64, rng.randint(1, 64)))
            r = Request(rng.random() < 0.1, sid, 0, self.gpa(sid), npages * PAGE,
                        HVA + ((sid & 15) << 32))
            f = rng.random()
            r.flags = GMEM if f < 0.7 else rng.choice((0, LOG, RO, GMEM | LOG, GMEM | RO,
                                                       GMEM | 8, 8, LOG | RO))
            if rng.random() < 0.05:  # (never an acceptable huge slot: KVM would allocate)
                r.size = rng.choice((0, PAGE + 1, (MAX_NR_PAGES + 1) * PAGE))
            if rng.random() < 0.04:
                r.hva = rng.choice((HVA + 8, 1 << 63, self.limits.user_va_end - PAGE))
            k = rng.random()
            if live and k < 0.72:
                r.kind = "live"
                r.pair = rng.choice(live)
                r.offset = self.number(r.pair.size)
            elif k < 0.82:
                r.kind, r.model_none = "none", rng.random() < 0.5
                r.offset = rng.randrange(0, 64) * PAGE
            elif k < 0.91:
                r.kind, r.offset = "memfd", 0
            else:
                r.kind, r.offset = "foreign", 0
        return r

    def set(self, r: Request) -> int:
        tags = region_tags(self.limits, self.shadow, self.files, r)
        kvm_fd, model_file = self._file_of(r)
        if r.v1:
            err, _ = self.both("v1", r.describe(),
                               lambda: self.kvm_vm.set_user_memory_region(
                                   r.slot, r.flags, r.gpa, r.size, r.hva),
                               lambda: self.model.set_memory_region(
                                   r.slot, r.flags, r.gpa, r.size, r.hva))
        else:
            err, _ = self.both("region2", r.describe(),
                               lambda: self.kvm_vm.set_user_memory_region2(
                                   r.slot, r.flags, r.gpa, r.size, r.hva, r.offset, kvm_fd),
                               lambda: self.model.set_memory_region2(
                                   r.slot, r.flags, r.gpa, r.size, r.hva, model_file,
                                   r.offset))
        if len(tags) == 1:
            self.stats[f"sole:{tags[0]}"] += 1
        if err == 0:
            self._accepted(r)
        self.check(r.describe())
        return err

    def _file_of(self, r: Request) -> tuple[int, GuestMemfd | HostMemory | None]:
        if r.kind == "live":
            assert r.pair is not None
            return (r.pair.fd if r.pair.open else NO_FD), r.pair.model
        if r.kind == "memfd":
            return self.memfd_fd, self.memfd
        if r.kind == "foreign":
            return self.foreign_fd, self.foreign
        return NO_FD, None if r.model_none else self.closed

    def _accepted(self, r: Request) -> None:
        old = self.shadow.get(r.slot)
        if r.size == 0:
            del self.shadow[r.slot]
            self.stats["ok:delete-gmem" if old and old.file is not None else "ok:delete"] += 1
            return
        if old is not None:  # MOVE / FLAGS_ONLY / no-op of a plain slot
            self.shadow[r.slot] = Shadow(r.slot, r.flags, r.gpa // PAGE, old.npages, old.hva)
            self.stats["ok:change"] += 1
            return
        gm = not r.v1 and r.flags & GMEM
        assert not gm or r.pair is not None
        self.shadow[r.slot] = Shadow(r.slot, r.flags, r.gpa // PAGE, r.size // PAGE, r.hva,
                                     r.pair.index if gm and r.pair else None,
                                     r.offset if gm else 0)
        self.stats["ok:create-gmem" if gm else "ok:create"] += 1

    def check(self, after: str) -> None:
        by_file = {id(p.model): p.index for p in self.files.values()}
        model = sorted((s.slot, s.flags, s.base_gfn, s.npages, s.hva,
                        by_file[id(s.gmem.file)] if s.gmem else None,
                        s.gmem.offset if s.gmem else 0)
                       for as_id in range(self.limits.address_spaces)
                       for s in self.model.slots(as_id))
        kvm = sorted((s.slot, s.flags, s.base_gfn, s.npages, s.hva, s.file, s.offset)
                     for s in self.shadow.values())
        assert model == kvm, f"after {after}:\n  kvmem: {model}\n  KVM:   {kvm}"
        for p in self.live():
            bindings = sorted((b.slot.as_id << 16 | b.slot.id, b.pgoff, b.npages)
                              for b in p.model.bindings)
            expected = sorted((s.slot, s.offset // PAGE, s.npages) for s in self.shadow.values()
                              if s.file == p.index)
            assert bindings == expected, f"after {after}: bindings of file#{p.index} differ"

    def close(self) -> None:
        for p in self.live():
            self.close_file(p)
        for s in list(self.shadow.values()):
            self.kvm_vm.set_user_memory_region(s.slot, 0, 0, 0, 0)
            self.model.set_memory_region(s.slot, 0, 0, 0, 0)
        self.kvm_vm.close()


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def limits(kvm: Kvm) -> HostLimits:
    return hostcaps.probe_kvm_limits(kvm)


@pytest.fixture
def world(kvm: Kvm, limits: HostLimits) -> Iterator[World]:
    other_kvm_vm = kvm.create_vm()
    other_model = hostcaps.vm_like_host(limits)
    memfd_fd = os.memfd_create("not-gmem")
    os.ftruncate(memfd_fd, 1 << 20)
    closed = kvmem.Vm().create_guest_memfd(PAGE, 0)
    closed.close()
    w = World(limits, kvm, kvm.create_vm(), hostcaps.vm_like_host(limits),
              other_kvm_vm.create_guest_memfd(1 << 20, 0),
              other_model.create_guest_memfd(1 << 20, 0), memfd_fd, HostMemory.memfd(1 << 20),
              closed, random.Random(SEED))
    yield w
    w.close()
    os.close(w.foreign_fd)
    w.foreign.close()
    other_kvm_vm.close()
    os.close(memfd_fd)
    w.memfd.close()


def test_differential_guest_memfd_slots(world: World) -> None:
    w, rng = world, world.rng
    while w.stats["calls"] < CALLS:
        op = rng.random()
        live = w.live()
        if op < 0.08 or not live:
            w.create_file()
        elif op < 0.11:
            w.close_file(rng.choice(live))
        elif op < 0.21:
            w.punch(rng.choice(live))
        elif op < 0.25:
            mapped = [p for p in live if p.real_map is not None]
            if mapped:
                w.scribble(rng.choice(mapped))
        else:
            w.set(w.region())
    sole = {t: w.stats[f"sole:{t}"] for t in SOLE_TAGS}
    calls = {k: v for k, v in sorted(w.stats.items()) if ":" in k and not k.startswith("sole")}
    print(f"\nguest_memfd slot differential (seed {SEED}): {w.stats['calls']} calls, "
          f"0 divergences; outcomes {calls}; rules hit alone {sole}; "
          f"{w.stats['contents compared']} content comparisons, {w.stats['close']} closes")
    # the generator reached every rule alone, and every outcome of every call
    assert all(n >= 3 for n in sole.values()), (sole, dict(w.stats))
    for key in ("create:OK", "create:EINVAL", "punch:OK", "punch:EINVAL", "region2:OK",
                "region2:EINVAL", "region2:EEXIST", "region2:EBADF", "v1:OK", "v1:EINVAL",
                "ok:create-gmem", "ok:delete-gmem", "ok:create", "ok:change"):
        assert w.stats[key] >= 5, (key, dict(w.stats))
    assert w.stats["contents compared"] >= 50


def test_deterministic_rows_of_8_3(world: World) -> None:
    """Readable failures for the rows the random test covers: each call and the errno KVM gave
    on this host (kvm-semantics §12)."""
    w = world
    w.rng = random.Random(0)
    while not w.live():
        w.create_file()
    f = FilePair(w.next_index, w.kvm_vm.create_guest_memfd(8 << 20, 0),
                 w.model.create_guest_memfd(8 << 20, 0), 8 << 20, 0)
    w.next_index += 1
    w.files[f.index] = f
    G = 1 << 30

    def req(slot: int, flags: int, gpa: int, size: int, offset: int = 0, kind: str = "live",
            v1: bool = False, hva: int = HVA) -> int:
        return w.set(Request(v1, slot, flags, gpa, size, hva, kind,
                             f if kind == "live" else None, offset))

    assert req(10, GMEM | LOG, G, 4 << 20) == errno.EINVAL
    assert req(10, GMEM | RO, G, 4 << 20) == errno.EINVAL
    assert req(10, GMEM, G, 4 << 20, 8, "live") == errno.EINVAL
    assert req(10, GMEM, G, 4 << 20, 0, "foreign") == errno.EINVAL
    assert req(10, GMEM, G, 4 << 20, 0, "memfd") == errno.EINVAL
    assert req(10, GMEM, G, 4 << 20, 0, "none") == errno.EBADF
    assert req(10, GMEM, G, 4 << 20, 6 << 20) == errno.EINVAL  # past the end
    assert req(10, GMEM, G, 4 << 20, 0) == 0
    assert req(11, GMEM, 2 * G, 4 << 20, 4 << 20) == 0
    assert req(12, GMEM, 3 * G, 4 << 20, 2 << 20) == errno.EINVAL  # pages already bound
    assert req(10, GMEM, G, 4 << 20, 0) == errno.EINVAL  # identical: immutable
    assert req(10, GMEM, G + (8 << 20), 4 << 20, 0) == errno.EINVAL  # MOVE
    assert req(10, 0, G, 4 << 20, v1=True) == errno.EINVAL  # dropping the flag
    assert req(10, GMEM, G, 4 << 20, v1=True) == errno.EINVAL  # the flag through V1
    assert req(10, 0, 0, 0, v1=True) == 0  # delete through V1
    for gpa in (2 * G - (2 << 20), 2 * G + (2 << 20)):  # selftest: overlap first
        assert req(10, GMEM, gpa, 4 << 20, 0) == errno.EEXIST
    assert req(11, GMEM, 0, 0, 1) == errno.EINVAL  # offset checked on a delete too
    assert req(11, GMEM, 0, 0, 0, "none") == 0


def test_a_forked_child_gets_eio(world: World) -> None:
    """§8.2 / §1.3 row 0: KVM_CREATE_GUEST_MEMFD and REGION2 from another mm are EIO before
    anything else is looked at — on both sides."""
    w = world
    while not w.live():
        w.create_file()
    pair = w.live()[0]
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "create_guest_memfd": (lambda: w.kvm_vm.create_guest_memfd(PAGE, 0),
                               lambda: w.model.create_guest_memfd(PAGE, 0)),
        "set_memory_region2": (
            lambda: w.kvm_vm.set_user_memory_region2(5, GMEM, 1 << 30, PAGE, HVA, 0, pair.fd),
            lambda: w.model.set_memory_region2(5, GMEM, 1 << 30, PAGE, HVA, pair.model, 0)),
        "set_memory_region2(bad flags)": (
            lambda: w.kvm_vm.set_user_memory_region2(5, GMEM | LOG, 0, PAGE, HVA, 0, NO_FD),
            lambda: w.model.set_memory_region2(5, GMEM | LOG, 0, PAGE, HVA, None, 0)),
    }

    results = outcomes_in_child(calls)
    assert set(results.values()) == {("EIO", "EIO")}, results
