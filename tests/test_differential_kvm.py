"""Differential test: `kvmem.Vm` against the real KVM, call by call.

Every call goes first to a real KVM VM (`kvmem.kvmapi.KvmVm`), then to a `kvmem.Vm` built by
`kvmem.hostcaps.vm_like_host()` (same address spaces, slot count, read-only support, max gfn and
user VA end as this host). Both must accept, or both must refuse with the same errno:
`KVM_SET_USER_MEMORY_REGION` (every row of kvm-semantics §1.3), `KVM_GET_DIRTY_LOG`,
`KVM_CLEAR_DIRTY_LOG` and `KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)` (§7.2). After every slot
call the model's layout must equal a shadow of what KVM accepted (KVM has no "list slots"
ioctl), and every bitmap KVM returns must equal the model's byte for byte. No guest runs, so
dirty bits come only from `KVM_DIRTY_LOG_INITIALLY_SET` (host writes are never logged).

Two parts:
- deterministic sequences (readable failures): the probe itself, every user slot id, address
  space 1, the 2^31-page limit, the §12 errno tables, the dirty bitmap's life across
  CREATE / MOVE / no-op / FLAGS_ONLY / DELETE, the calls from a forked child (EIO), a range
  ending exactly at 2^64;
- a Hypothesis state machine issuing thousands of random calls biased towards every rule, with
  a coverage check at the end (each rule was hit as the *only* broken rule, each change kind
  succeeded), so a generator that stopped reaching a rule fails instead of passing quietly.

Set KVMEM_DIFF_RANDOM=1 for a fresh random seed (default: derandomized, reproducible) and
KVMEM_DIFF_EXAMPLES=<n> for a longer run.

Slots larger than 2^18 pages are never *installed*: KVM allocates its per-page metadata for
them up front (a 2^31-1-page slot took 6-57 s per create here, and a MOVE of one got the test
process OOM-killed on this 24 GiB machine), so 2^31-1-page requests are only issued where KVM
refuses them before allocating (overlap → EEXIST, beyond the max gfn → EINVAL, bad hva →
EINVAL). A FLAGS_ONLY change with LOG_DIRTY on→on cannot be made at all: with the V1 ioctl
the only flag an existing slot may change is LOG_DIRTY itself, so the bitmap hand-over is
checked through MOVE (on→on) and the identical no-op instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from forked import outcomes_in_child
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import kvmem
from kvmem import hostcaps, kvmapi
from kvmem.hostcaps import HostLimits
from kvmem.kvmapi import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Kvm,
    dirty_bitmap_bytes,
)

_REASON = kvmapi.kvm_available()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

pytestmark = pytest.mark.kvm

PAGE = 4096
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
KERNEL_HVA = 0xFFFF_8000_0000_0000
U64_END = 1 << 64
MAX_NR_PAGES = (1 << 31) - 1  # KVM_MEM_MAX_NR_PAGES
INTERNAL_SLOT_END = 32767  # KVM_MEM_SLOTS_NUM
BIGGEST_INSTALLED = 1 << 18  # pages; see the module docstring
REGION_PAGES = 512
N_REGIONS = 3

# what the whole module compared, by call and outcome (printed by the property test)
STATS: Counter[str] = Counter()


def _name(err: int) -> str:
    return "OK" if err == 0 else errno.errorcode.get(err, str(err))


def bits_of(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


def bitmap_with(bits: Callable[[int], bool], npages: int) -> bytes:
    out = bytearray(dirty_bitmap_bytes(npages))
    for i in range(npages):
        if bits(i):
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# the pair: one KVM VM and one model VM, every result compared


@dataclass(frozen=True)
class Shadow:
    """A slot as KVM accepted it (`slot` is the ioctl's u32: as_id << 16 | id)."""

    slot: int
    flags: int
    base_gfn: int
    npages: int
    hva: int

    @property
    def as_id(self) -> int:
        return self.slot >> 16

    @property
    def id(self) -> int:
        return self.slot & 0xFFFF

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages


class Pair:
    """A real KVM VM and a `kvmem.Vm` like the host, driven with the same calls.

    Each method makes the call on both, asserts the same outcome (0 or the same errno) and
    returns it; `get` also returns the bitmap, asserted equal on both sides."""

    def __init__(self, kvm: Kvm, limits: HostLimits) -> None:
        self.limits = limits
        self.kvm_vm = kvm.create_vm()
        self.model = hostcaps.vm_like_host(limits)
        self.shadow: dict[int, Shadow] = {}
        self.history: list[str] = []

    def close(self) -> None:
        self.kvm_vm.close()

    def _both(self, kind: str, call: str, on_kvm: Callable[[], object],
              on_model: Callable[[], object]) -> tuple[int, object, object]:
        try:
            k_result, k_err = on_kvm(), 0
        except OSError as e:
            k_result, k_err = None, e.errno or 0
        try:
            m_result, m_err, m_msg = on_model(), 0, ""
        except kvmem.KvmError as e:
            m_result, m_err, m_msg = None, e.errno or 0, str(e)
        STATS[f"{kind}:{_name(k_err)}"] += 1
        STATS["calls"] += 1
        self.history.append(f"{call} -> {_name(k_err)}")
        if k_err != m_err:
            recent = "\n  ".join(self.history[-25:])
            raise AssertionError(
                f"{call}: KVM says {_name(k_err)}, kvmem says {_name(m_err)} {m_msg}\n"
                f"calls on this VM (last 25):\n  {recent}"
            )
        return k_err, k_result, m_result

    # -- KVM_SET_USER_MEMORY_REGION ------------------------------------------------------------
    def set(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> int:
        call = f"set(slot={slot:#x}, flags={flags:#x}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x})"
        tags = rule_tags(self.limits, self.shadow, slot, flags, gpa, size, hva)
        before = self.shadow.get(slot)
        err, _, _ = self._both(
            "set", call,
            lambda: self.kvm_vm.set_user_memory_region(slot, flags, gpa, size, hva),
            lambda: self.model.set_memory_region(slot, flags, gpa, size, hva),
        )
        if len(tags) == 1:
            STATS[f"sole:{tags[0]}"] += 1
        if err == 0:
            kind = _change_kind(before, flags, gpa, size)
            STATS[f"ok:{kind}"] += 1
            if flags & LOG and kind in ("create", "flags-only"):
                STATS[f"ok:log-on-with-mode-{self.model.manual_dirty_log_protect}"] += 1
            if size == 0:
                del self.shadow[slot]
            else:
                self.shadow[slot] = Shadow(slot, flags, gpa // PAGE, size // PAGE, hva)
        self.check_layout(call)
        return err

    def check_layout(self, after: str = "") -> None:
        for as_id in range(self.limits.address_spaces):
            model = [(s.id, s.base_gfn, s.npages, s.hva, s.flags)
                     for s in self.model.slots(as_id)]
            kvm = sorted(((s.id, s.base_gfn, s.npages, s.hva, s.flags)
                          for s in self.shadow.values() if s.as_id == as_id),
                         key=lambda t: t[1])
            assert model == kvm, (f"after {after}: address space {as_id} differs\n"
                                  f"  kvmem: {model}\n  KVM:   {kvm}")

    # -- dirty log ----------------------------------------------------------------------------
    def get(self, slot: int) -> tuple[int, bytes]:
        npages = self.shadow[slot].npages if slot in self.shadow else 0
        call = f"get_dirty_log(slot={slot:#x})"
        err, k_bits, m_bits = self._both(
            "get", call,
            lambda: self.kvm_vm.get_dirty_log(slot, npages),
            lambda: self.model.get_dirty_log(slot),
        )
        if err:
            return err, b""
        assert isinstance(k_bits, bytes) and isinstance(m_bits, bytes)
        assert m_bits == k_bits, (f"{call}: bitmaps differ\n  KVM set bits:   "
                                  f"{sorted(bits_of(k_bits))}\n  kvmem set bits: "
                                  f"{sorted(bits_of(m_bits))}\n  history: {self.history[-25:]}")
        STATS["get:bits" if any(k_bits) else "get:empty"] += 1
        return err, k_bits

    def clear(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> int:
        call = (f"clear_dirty_log(slot={slot:#x}, first_page={first_page:#x}, "
                f"num_pages={num_pages:#x}, bitmap={len(bitmap)} bytes)")
        err, _, _ = self._both(
            "clear", call,
            lambda: self.kvm_vm.clear_dirty_log(slot, first_page, num_pages, bitmap),
            lambda: self.model.clear_dirty_log(slot, first_page, num_pages, bitmap),
        )
        return err

    def enable(self, args0: int, flags: int = 0) -> int:
        call = f"enable_cap(MANUAL_DIRTY_LOG_PROTECT2, args0={args0:#x}, flags={flags:#x})"
        err, _, _ = self._both(
            "enable", call,
            lambda: self.kvm_vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args0, flags=flags),
            lambda: self.model.enable_cap_manual_dirty_log_protect(args0, flags),
        )
        return err


def _change_kind(before: Shadow | None, flags: int, gpa: int, size: int) -> str:
    if size == 0:
        return "delete"
    if before is None:
        return "create"
    if gpa // PAGE != before.base_gfn:
        return "move"
    return "flags-only" if flags != before.flags else "no-op"


def rule_tags(limits: HostLimits, shadow: dict[int, Shadow], slot: int, flags: int, gpa: int,
              size: int, hva: int) -> list[str]:
    """Which of §1.3's rules the request breaks — written from the kernel's text, not from
    kvmem, and used only to measure coverage (a request breaking exactly one rule tests that
    rule whatever the order of the checks)."""
    as_id, sid = slot >> 16, slot & 0xFFFF
    tags = []
    if flags & ~(LOG | RO) or (flags & RO and not limits.readonly_mem):
        tags.append("flags")
    if sid >= limits.max_slots:
        tags.append("slot-id")
    if size % PAGE:
        tags.append("size-unaligned")
    if gpa % PAGE:
        tags.append("gpa-unaligned")
    if hva % PAGE:
        tags.append("hva-unaligned")
    if hva + size > limits.user_va_end:
        tags.append("hva-range")
    if as_id >= limits.address_spaces:
        tags.append("as-id")
    if gpa + size > U64_END:
        tags.append("gpa-wrap")
    if size // PAGE > MAX_NR_PAGES:
        tags.append("too-many-pages")
    if tags:
        return tags
    old = shadow.get(slot)
    if size == 0:
        return [] if old is not None else ["delete-missing"]
    if old is not None:
        if hva != old.hva:
            tags.append("hva-change")
        if size // PAGE != old.npages:
            tags.append("size-change")
        if (flags ^ old.flags) & RO:
            tags.append("ro-change")
        if tags or gpa // PAGE == old.base_gfn:
            return tags
    lo, hi = gpa // PAGE, (gpa + size) // PAGE
    if any(s.as_id == as_id and s.slot != slot and s.base_gfn < hi and lo < s.end_gfn
           for s in shadow.values()):
        tags.append("overlap")
    if hi - 1 > limits.max_gfn:
        tags.append("max-gfn")
    return tags


# every tag the random test must have produced alone, and every successful change kind
SOLE_TAGS = ("flags", "slot-id", "as-id", "size-unaligned", "gpa-unaligned", "hva-unaligned",
             "hva-range", "gpa-wrap", "too-many-pages", "delete-missing", "hva-change",
             "size-change", "ro-change", "overlap", "max-gfn")
OK_KINDS = ("create", "delete", "move", "flags-only", "no-op")


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def limits(kvm: Kvm) -> HostLimits:
    return hostcaps.probe_kvm_limits(kvm)


@pytest.fixture(scope="module")
def regions() -> Iterator[list[int]]:
    """hvas of a few real (never touched) anonymous mappings, kept for the whole module."""
    maps = [mmap.mmap(-1, REGION_PAGES * PAGE) for _ in range(N_REGIONS)]
    yield [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in maps]
    for m in maps:
        m.close()


@pytest.fixture
def pair(kvm: Kvm, limits: HostLimits) -> Iterator[Pair]:
    p = Pair(kvm, limits)
    yield p
    p.close()


# ---------------------------------------------------------------------------------------------
# hostcaps


def test_probe_agrees_with_capabilities_and_with_the_kernel(kvm: Kvm, limits: HostLimits) -> None:
    caps = kvm.caps()
    assert (limits.address_spaces, limits.max_slots, limits.readonly_mem,
            limits.manual_dirty_log_protect, limits.dirty_ring_max_bytes) == (
        caps.address_spaces, caps.nr_memslots, caps.readonly_mem,
        caps.manual_dirty_log_protect, caps.dirty_ring_max_bytes)
    assert limits.max_gfn == (1 << (limits.phys_bits - 12)) - 1
    assert 32 <= limits.phys_bits <= 64 and limits.user_va_end % PAGE == 0
    # the two measured limits, checked at their edges on a fresh VM
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, limits.max_gfn * PAGE, PAGE, 0x10000)
        with pytest.raises(OSError) as info:
            vm.set_user_memory_region(1, 0, (limits.max_gfn + 1) * PAGE, PAGE, 0x10000)
        assert info.value.errno == errno.EINVAL
        vm.set_user_memory_region(2, 0, 0, PAGE, limits.user_va_end - PAGE)
        with pytest.raises(OSError) as info:
            vm.set_user_memory_region(3, 0, PAGE, PAGE, limits.user_va_end)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_slots = 1  # type: ignore[misc]
    vm_model = hostcaps.vm_like_host(limits)
    assert (vm_model.limits.address_spaces, vm_model.limits.max_slots,
            vm_model.limits.readonly_mem, vm_model.limits.phys_bits,
            vm_model.limits.user_va_end) == (limits.address_spaces, limits.max_slots,
                                             limits.readonly_mem, limits.phys_bits,
                                             limits.user_va_end)


def test_default_vm_differs_from_the_host_only_by_address_spaces(
        pair: Pair, limits: HostLimits) -> None:
    if limits.address_spaces != 1:
        pytest.skip(f"host VMs have {limits.address_spaces} address spaces (SMM)")
    # here: no SMM, so address space 1 does not exist...
    assert pair.set(1 << 16, 0, 0, PAGE, 0x10000) == errno.EINVAL
    assert pair.set(2 << 16, 0, 0, PAGE, 0x10000) == errno.EINVAL
    assert pair.get(1 << 16)[0] == errno.EINVAL
    assert pair.clear(1 << 16, 0, 0, b"") == errno.EINVAL
    # ...while kvmem's default VM is x86 with SMM and takes it
    default = kvmem.Vm()
    default.set_memory_region(1 << 16, 0, 0, PAGE, 0x10000)
    assert [(s.as_id, s.id) for s in default.slots(1)] == [(1, 0)]
    differences = {f.name: (getattr(default.limits, f.name), getattr(pair.model.limits, f.name))
                   for f in dataclasses.fields(default.limits)
                   if getattr(default.limits, f.name) != getattr(pair.model.limits, f.name)}
    assert differences == {"address_spaces": (2, 1)}


# ---------------------------------------------------------------------------------------------
# deterministic sequences


def test_every_user_slot_id_is_usable_and_the_next_is_refused(
        pair: Pair, limits: HostLimits, regions: list[int]) -> None:
    n = limits.max_slots
    kvm_vm, model = pair.kvm_vm, pair.model
    hva = regions[0]
    for i in range(n):  # not through `pair`: 2 × 32764 layout comparisons would take minutes
        kvm_vm.set_user_memory_region(i, 0, i * PAGE, PAGE, hva)
        model.set_memory_region(i, 0, i * PAGE, PAGE, hva)
        pair.shadow[i] = Shadow(i, 0, i, 1, hva)
    pair.check_layout(f"{n} creates")
    assert len(model.slots(0)) == n
    for slot in (n, n + 1, INTERNAL_SLOT_END - 1, INTERNAL_SLOT_END, 0xFFFF):
        assert pair.set(slot, 0, (1 << 30) + slot * PAGE, PAGE, hva) == errno.EINVAL
    # full table: every id is taken, so the only way in is through an existing id
    assert pair.set(n - 1, 0, 1 << 30, PAGE, hva) == 0  # MOVE of the last id
    assert pair.set(n - 2, 0, 1 << 30, PAGE, hva) == errno.EEXIST
    assert pair.set(0, 0, 0, 0, hva) == 0
    assert pair.set(0, LOG, 0, PAGE, hva) == 0


def test_page_count_limit_is_checked_before_the_overlap(pair: Pair, regions: list[int]) -> None:
    # A 2^31-1-page slot is fine as far as the count goes, so it reaches the overlap check
    # (EEXIST); 2^31 pages is refused by the count (EINVAL). Neither allocates anything.
    assert pair.set(0, 0, 0x10_0000, PAGE, 0x10000) == 0
    assert pair.set(1, LOG, 0, MAX_NR_PAGES * PAGE, 0x10000) == errno.EEXIST
    assert pair.set(1, 0, 0, (MAX_NR_PAGES + 1) * PAGE, 0x10000) == errno.EINVAL
    assert pair.set(0, 0, 0x10_0000, MAX_NR_PAGES * PAGE, 0x10000) == errno.EINVAL  # resize
    assert pair.set(1, 0, 0, MAX_NR_PAGES * PAGE, regions[0]) == errno.EINVAL  # beyond user VA
    # beyond the max gfn: refused by x86 prepare, after the overlap check
    top = (pair.limits.max_gfn + 1) * PAGE
    assert pair.set(2, 0, top - PAGE, MAX_NR_PAGES * PAGE, 0x10000) == errno.EINVAL
    assert pair.set(2, 0, top - PAGE, PAGE, 0x10000) == 0
    assert pair.set(3, 0, top - PAGE, 2 * PAGE, 0x10000) == errno.EEXIST
    assert pair.set(3, 0, top, PAGE, 0x10000) == errno.EINVAL


def test_set_memory_region_errnos_of_section_12(pair: Pair, limits: HostLimits,
                                                regions: list[int]) -> None:
    h, h2 = regions[0], regions[1]
    p = pair
    # request shape
    assert p.set(0, 0, 0, PAGE + 1, h) == errno.EINVAL
    assert p.set(0, 0, 1, PAGE, h) == errno.EINVAL
    assert p.set(0, 0, 0, PAGE, h + 1) == errno.EINVAL
    assert p.set(0, 0, 0, PAGE, KERNEL_HVA) == errno.EINVAL
    assert p.set(0, 0, 0, 1 << 47, h) == errno.EINVAL
    assert p.set(0, 0, 0, PAGE, limits.user_va_end) == errno.EINVAL
    assert p.set(0, 0, U64_END - PAGE, 2 * PAGE, h) == errno.EINVAL
    for bad in (4, 8, 1 << 16, 1 << 31):
        assert p.set(0, bad, 0, PAGE, h) == errno.EINVAL
    assert p.set(0, 0, 0, 0, h) == errno.EINVAL  # delete of nothing
    assert p.set(0x7FFF_0000 | 1, 0, 0, 0, h) == errno.EINVAL
    # creation, overlap, adjacency, aliasing
    assert p.set(0, 0, 0, 16 * PAGE, h) == 0
    assert p.set(1, 0, 8 * PAGE, 16 * PAGE, h2) == errno.EEXIST
    assert p.set(1, 0, 0, 32 * PAGE, h2) == errno.EEXIST  # straddles
    assert p.set(1, 0, 16 * PAGE, 16 * PAGE, h) == 0  # adjacent, same hva as slot 0
    assert p.set(2, RO | LOG, 64 * PAGE, 4 * PAGE, h) == 0
    # existing slot
    assert p.set(0, 0, 0, 16 * PAGE, h) == 0  # identical: no-op
    assert p.set(0, 0, 0, 8 * PAGE, h) == errno.EINVAL  # size
    assert p.set(0, 0, 0, 16 * PAGE, h2) == errno.EINVAL  # hva
    assert p.set(0, RO, 0, 16 * PAGE, h) == errno.EINVAL  # READONLY on
    assert p.set(2, LOG, 64 * PAGE, 4 * PAGE, h) == errno.EINVAL  # READONLY off
    assert p.set(0, LOG, 0, 16 * PAGE, h) == 0  # FLAGS_ONLY on
    assert p.set(0, 0, 0, 16 * PAGE, h) == 0  # FLAGS_ONLY off
    assert p.set(0, 0, 8 * PAGE, 16 * PAGE, h) == errno.EEXIST  # MOVE onto slot 1
    assert p.set(1, LOG, 20 * PAGE, 16 * PAGE, h) == 0  # MOVE over its own range + LOG
    assert p.set(0, 0, 100 * PAGE, 16 * PAGE, h) == 0  # MOVE elsewhere
    # delete: flags ignored, but the shape checks still run
    assert p.set(1, 0, 1, 0, h) == errno.EINVAL
    assert p.set(1, 0, 0, 0, KERNEL_HVA) == errno.EINVAL
    assert p.set(1, RO, 0, 0, 0) == 0
    assert p.set(1, 0, 0, 0, h) == errno.EINVAL  # already gone


def test_dirty_log_errnos_of_section_12(pair: Pair, limits: HostLimits,
                                        regions: list[int]) -> None:
    p, h = pair, regions[0]
    assert p.set(0, 0, 0, 64 * PAGE, h) == 0
    assert p.set(1, LOG, 64 * PAGE, 64 * PAGE, h) == 0
    assert p.set(2, LOG, 128 * PAGE, 70 * PAGE, h) == 0
    assert p.get(0)[0] == errno.ENOENT  # no LOG_DIRTY
    assert p.get(5)[0] == errno.ENOENT  # no slot
    assert p.get(limits.max_slots)[0] == errno.EINVAL
    assert p.get(0xFFFF)[0] == errno.EINVAL
    ones = bitmap_with(lambda i: True, 64)
    assert p.clear(1, 0, 64, ones) == 0  # manual protect never enabled: still fine
    assert p.clear(1, 1, 63, ones) == errno.EINVAL  # first_page not a multiple of 64
    assert p.clear(1, 0, 32, ones) == errno.EINVAL  # partial word, not at the end
    assert p.clear(1, 0, 65, ones + bytes(8)) == errno.EINVAL  # beyond the slot
    assert p.clear(1, 64, 0, b"") == 0  # empty range at the end
    assert p.clear(1, 128, 0, b"") == errno.EINVAL
    assert p.clear(0, 0, 64, ones) == errno.ENOENT  # no bitmap
    assert p.clear(1, 1, 64, ones) == errno.EINVAL  # alignment before existence
    assert p.clear(5, 1, 64, ones) == errno.EINVAL
    assert p.clear(5, 0, 64, ones) == errno.ENOENT
    assert p.clear(2, 64, 6, bytes(8)) == 0  # 70-page slot: the tail word
    assert p.clear(limits.max_slots, 0, 0, b"") == errno.EINVAL
    for args0, flags in ((4, 0), (2, 0), (1, 1), (3, 1), (1 << 63, 0), (7, 0)):
        assert p.enable(args0, flags) == errno.EINVAL
    for args0 in (3, 1, 0):  # may change at any time, slots present or not
        assert p.enable(args0) == 0


def test_dirty_bitmap_life_without_a_guest(pair: Pair, regions: list[int]) -> None:
    p, h = pair, regions[0]
    all70 = set(range(70))
    assert p.enable(3) == 0  # manual protect + INITIALLY_SET
    assert p.set(0, LOG, 0, 70 * PAGE, h) == 0  # CREATE: bits 0..69 exactly
    assert bits_of(p.get(0)[1]) == all70
    assert bits_of(p.get(0)[1]) == all70  # manual protect: GET clears nothing
    assert p.clear(0, 0, 64, bitmap_with(lambda i: i % 2 == 0, 64)) == 0
    odd_low = {i for i in range(64) if i % 2} | set(range(64, 70))
    assert bits_of(p.get(0)[1]) == odd_low
    assert p.set(0, LOG, 0, 70 * PAGE, h) == 0  # identical: no-op, bitmap untouched
    assert bits_of(p.get(0)[1]) == odd_low
    assert p.set(0, LOG, 1 << 20, 70 * PAGE, h) == 0  # MOVE, LOG on→on: same bitmap
    assert bits_of(p.get(0)[1]) == odd_low
    assert p.set(0, 0, 1 << 21, 70 * PAGE, h) == 0  # MOVE + LOG off: bitmap freed
    assert p.get(0)[0] == errno.ENOENT
    assert p.set(0, LOG, 1 << 21, 70 * PAGE, h) == 0  # FLAGS_ONLY off→on: fresh, all set
    assert bits_of(p.get(0)[1]) == all70
    assert p.clear(0, 0, 70, bitmap_with(lambda i: True, 70)) == 0
    assert bits_of(p.get(0)[1]) == set()
    assert p.set(0, 0, 0, 0, h) == 0  # DELETE frees it
    assert p.get(0)[0] == errno.ENOENT
    assert p.set(0, LOG, 0, 70 * PAGE, h) == 0  # re-CREATE: new bitmap, all set again
    assert bits_of(p.get(0)[1]) == all70
    assert p.enable(1) == 0  # INITIALLY_SET off: later bitmaps start empty...
    assert p.set(1, LOG, 1 << 22, 130 * PAGE, h) == 0
    assert bits_of(p.get(1)[1]) == set()
    assert bits_of(p.get(0)[1]) == all70  # ...existing ones keep their bits
    assert p.enable(0) == 0  # manual protect off: GET harvests
    assert bits_of(p.get(0)[1]) == all70
    assert bits_of(p.get(0)[1]) == set()
    assert p.enable(3) == 0
    assert p.set(2, RO | LOG, 1 << 23, PAGE, h) == 0  # read-only slots log too
    assert bits_of(p.get(2)[1]) == {0}
    assert len(p.get(1)[1]) == 24  # 130 pages → three 64-bit words


def test_a_forked_child_gets_eio_from_every_vm_ioctl(pair: Pair) -> None:
    # §1.3 row 0: a VM fd used from another mm answers EIO to every VM ioctl (kvm_vm_ioctl
    # checks `kvm->mm != current->mm` before looking at the request): slots, dirty log,
    # ENABLE_CAP and CREATE_VCPU alike
    assert pair.set(0, LOG, 0, PAGE, 0x10000) == 0
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "set_memory_region": (
            lambda: pair.kvm_vm.set_user_memory_region(1, 0, PAGE, PAGE, 0x10000),
            lambda: pair.model.set_memory_region(1, 0, PAGE, PAGE, 0x10000)),
        "get_dirty_log": (lambda: pair.kvm_vm.get_dirty_log(0, 1),
                          lambda: pair.model.get_dirty_log(0)),
        "clear_dirty_log": (lambda: pair.kvm_vm.clear_dirty_log(0, 0, 1, bytes(8)),
                            lambda: pair.model.clear_dirty_log(0, 0, 1, bytes(8))),
        "enable_cap(MANUAL_DIRTY_LOG_PROTECT2, 1)": (
            lambda: pair.kvm_vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1),
            lambda: pair.model.enable_cap_manual_dirty_log_protect(1)),
        "enable_cap(MANUAL_DIRTY_LOG_PROTECT2, 4)": (
            lambda: pair.kvm_vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 4),
            lambda: pair.model.enable_cap_manual_dirty_log_protect(4)),
        "create_vcpu(0)": (lambda: pair.kvm_vm.create_vcpu(0),
                           lambda: pair.model.create_vcpu(0)),
    }

    results = outcomes_in_child(calls)
    kvm = {name: both[0] for name, both in results.items()}
    model = {name: both[1] for name, both in results.items()}
    assert set(kvm.values()) == {"EIO"}, kvm
    assert model == kvm, f"from a forked child: KVM {kvm}, kvmem {model}"


def test_a_range_ending_exactly_at_2_64_wraps(pair: Pair, limits: HostLimits) -> None:
    # KVM's check is `gpa + size < gpa` in u64: a range ending exactly at 2^64 wraps to 0 and
    # is refused by it, whatever the max gfn. On this host the max gfn refuses it as well, so
    # the pair agrees; a kvmem VM whose max gfn allows the top page (phys_bits=64, which
    # Vm() takes and probe_kvm_limits returns when every gfn is accepted) must still refuse it.
    assert pair.set(0, 0, U64_END - PAGE, PAGE, 0x10000) == errno.EINVAL
    assert pair.set(0, 0, U64_END - 2 * PAGE, 2 * PAGE, 0x10000) == errno.EINVAL
    wide = kvmem.Vm(limits.address_spaces, limits.max_slots, readonly_mem=limits.readonly_mem,
                    phys_bits=64, user_va_end=limits.user_va_end)
    with pytest.raises(kvmem.KvmError) as info:
        wide.set_memory_region(0, 0, U64_END - PAGE, PAGE, 0x10000)
    assert info.value.errno == errno.EINVAL


# ---------------------------------------------------------------------------------------------
# the random part


def _weighted(*choices: tuple[int, st.SearchStrategy[int]]) -> st.SearchStrategy[int]:
    return st.one_of(*[s for w, s in choices for _ in range(w)])


def _strategies(limits: HostLimits, hvas: list[int]) -> dict[str, st.SearchStrategy[int]]:
    n = limits.max_slots
    top = limits.max_gfn + 1
    va_end = limits.user_va_end
    small_pages = [0, 1, 2, 3, 4, 8, 16, 32, 64, 65, 128, 256, 1024]
    slot_id = _weighted(
        (6, st.sampled_from([0, 1, 2, 3, 4, 5])),
        (2, st.sampled_from([n - 1, n, n + 1, INTERNAL_SLOT_END - 1, INTERNAL_SLOT_END, 0xFFFF])),
        (1, st.integers(0, 0xFFFF)),
    )
    as_id = _weighted((8, st.just(0)), (1, st.sampled_from([1, 2, 0xFFFF])))
    pool_hvas = [b + k * PAGE for b in hvas for k in (0, 1, 64)]
    return {
        "slot": st.builds(lambda a, i: (a << 16) | i, as_id, slot_id),
        "small_slot": st.sampled_from([0, 1, 2, 3, 4, 5]),
        "flags": _weighted(
            (8, st.sampled_from([0, LOG, RO, RO | LOG])),
            (2, st.sampled_from([4, 5, 8, 1 << 16, 1 << 17, 1 << 31, 0xFFFF_FFFF])),
        ),
        "sane_flags": st.sampled_from([0, 0, LOG, LOG, RO, RO | LOG]),
        "gpa": _weighted(
            (8, st.sampled_from([p * PAGE for p in small_pages])),
            (2, st.sampled_from([p * PAGE + d for p in small_pages for d in (1, 0x800, 0xFFF)])),
            (2, st.sampled_from([(top - k) * PAGE for k in (0, 1, 2, 16, 64, -1)])),
            (2, st.sampled_from([U64_END - k * PAGE for k in (1, 2, 16, 64)] + [U64_END - 1])),
            (1, st.integers(0, (1 << 52) - 1).map(lambda g: g * PAGE)),
            (1, st.integers(0, U64_END - 1)),
        ),
        "sane_gpa": st.sampled_from([p * PAGE for p in small_pages]),
        "size": _weighted(
            (2, st.just(0)),
            (8, st.sampled_from([p * PAGE for p in (1, 2, 3, 4, 16, 63, 64, 65, 70, 128, 256)])),
            (1, st.sampled_from([1 << 16, BIGGEST_INSTALLED]).map(lambda p: p * PAGE)),
            (2, st.sampled_from([1, 0x800, PAGE - 1, PAGE + 1, 3 * PAGE + 5])),
            (2, st.sampled_from([(MAX_NR_PAGES + 1) * PAGE, (MAX_NR_PAGES + 2) * PAGE,
                                 (1 << 32) * PAGE, 1 << 63, U64_END - PAGE, U64_END - 1])),
        ),
        "sane_size": st.sampled_from([0] + [p * PAGE for p in (1, 2, 4, 16, 64, 65, 70, 128)]),
        "hva": _weighted(
            (8, st.sampled_from(pool_hvas)),
            (2, st.sampled_from([h + d for h in hvas for d in (1, 0x800)])),
            (2, st.sampled_from([KERNEL_HVA, U64_END - PAGE, 0xFFFF_FFFF_FFFF_0000])),
            (2, st.sampled_from([va_end - k * PAGE for k in (0, 1, 2, 16, -1)])),
            (1, st.sampled_from([0, 0x10000])),
            (1, st.integers(0, U64_END - 1)),
        ),
        "sane_hva": st.sampled_from(pool_hvas),
    }


MUTATIONS = ("same", "delete", "delete-odd-fields", "move", "move-adjacent", "move-over-self",
             "move-toggle-log", "toggle-log", "toggle-ro", "resize", "rehva", "other-id",
             "other-as", "move-to-max-gfn", "move-to-2^64", "bad-flag")


def _bitmap(kind: str, seed: int, num_pages: int) -> bytes:
    n = dirty_bitmap_bytes(num_pages)
    if kind == "zeros":
        return bytes(n)
    if kind == "ones":
        return b"\xff" * n
    if kind == "first":
        return bytes([1]) + bytes(n - 1) if n else b""
    return random.Random(seed).randbytes(n)


def make_machine(kvm: Kvm, limits: HostLimits, hvas: list[int]
                 ) -> type[RuleBasedStateMachine]:
    S = _strategies(limits, hvas)

    class DifferentialMachine(RuleBasedStateMachine):
        """One KVM VM and one model VM per example; every rule is one compared call."""

        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair(kvm, limits)

        def teardown(self) -> None:
            self.pair.close()

        @initialize(args0=st.sampled_from([3, 3, 1, 0]))
        def start_with_a_dirty_log_mode(self, args0: int) -> None:
            # most examples log with INITIALLY_SET, so bitmaps have content to compare
            self.pair.enable(args0)

        def _existing(self, data: st.DataObject, want_log: bool = False) -> Shadow:
            slots = sorted(self.pair.shadow.values(), key=lambda s: s.slot)
            if want_log and any(s.flags & LOG for s in slots):
                slots = [s for s in slots if s.flags & LOG]
            return data.draw(st.sampled_from(slots), label="existing slot")

        @rule(slot=S["slot"], flags=S["flags"], gpa=S["gpa"], size=S["size"], hva=S["hva"])
        def set_anything(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
            self.pair.set(slot, flags, gpa, size, hva)

        @rule(slot=S["small_slot"], flags=S["sane_flags"], gpa=S["sane_gpa"],
              size=S["sane_size"], hva=S["sane_hva"])
        def set_plausible(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
            self.pair.set(slot, flags, gpa, size, hva)


        @precondition(lambda self: bool(self.pair.shadow))
        @rule(data=st.data(), how=st.sampled_from(MUTATIONS))
        def change_existing(self, data: st.DataObject, how: str) -> None:
            s = self._existing(data)
            slot, flags, gpa, size, hva = s.slot, s.flags, s.base_gfn * PAGE, s.npages * PAGE, s.hva
            if how == "delete":
                size = 0
            elif how == "delete-odd-fields":
                size = 0
                flags, gpa, hva = data.draw(S["flags"]), data.draw(S["gpa"]), data.draw(S["hva"])
            elif how == "move":
                gpa = data.draw(S["gpa"])
            elif how == "move-adjacent":
                others = [o for o in self.pair.shadow.values() if o.as_id == s.as_id]
                o = data.draw(st.sampled_from(sorted(others, key=lambda x: x.slot)))
                gpa = data.draw(st.sampled_from(
                    [o.end_gfn * PAGE, max(0, o.base_gfn - s.npages) * PAGE,
                     max(0, o.base_gfn - s.npages + 1) * PAGE, (o.end_gfn - 1) * PAGE]))
            elif how == "move-over-self":
                gpa = max(0, gpa + data.draw(st.sampled_from([-2, -1, 1, 2])) * PAGE)
            elif how == "move-toggle-log":
                gpa, flags = data.draw(S["sane_gpa"]), flags ^ LOG
            elif how == "toggle-log":
                flags ^= LOG
            elif how == "toggle-ro":
                flags ^= RO
            elif how == "resize":
                size = data.draw(st.sampled_from([size + PAGE, size - PAGE, 2 * size, PAGE]))
            elif how == "rehva":
                hva = data.draw(S["sane_hva"])
            elif how == "other-id":
                slot = (slot & ~0xFFFF) | data.draw(S["slot"]) & 0xFFFF
            elif how == "other-as":
                slot = (data.draw(st.sampled_from([1, 2, 0xFFFF])) << 16) | s.id
            elif how == "move-to-max-gfn":
                top = limits.max_gfn + 1
                gpa = (top - s.npages + data.draw(st.sampled_from([0, 1, -1]))) * PAGE
            elif how == "move-to-2^64":  # ends exactly at 2^64, or wraps past it
                over = data.draw(st.sampled_from([0, 1])) if s.npages > 1 else 0
                gpa = U64_END - (s.npages - over) * PAGE
            elif how == "bad-flag":
                flags |= data.draw(st.sampled_from([4, 8, 1 << 16]))
            self.pair.set(slot, flags, gpa, size, hva)

        @precondition(lambda self: any(s.as_id == 0 for s in self.pair.shadow.values()))
        @rule(data=st.data(), pages=st.sampled_from([MAX_NR_PAGES, MAX_NR_PAGES + 1]),
              below=st.sampled_from([0, 1, 100]), slot_id=S["slot"], flags=S["flags"])
        def huge_over_an_existing_slot(self, data: st.DataObject, pages: int, below: int,
                                       slot_id: int, flags: int) -> None:
            # covers an installed slot of another id, so KVM stops at the overlap (or earlier)
            # and never allocates metadata for 2^31 pages; an existing id fails on its size
            target = self._existing(data)
            gpa = max(0, target.base_gfn - below) * PAGE
            hva = data.draw(st.sampled_from([0, 0x10000, hvas[0], KERNEL_HVA]))
            slot = (target.as_id << 16) | (slot_id & 0xFFFF)
            self.pair.set(slot, flags, gpa, pages * PAGE, hva)
            STATS[f"huge:{pages}"] += 1

        @rule(slot=S["slot"], pages=st.sampled_from([MAX_NR_PAGES, MAX_NR_PAGES + 1, 1 << 20]),
              back=st.sampled_from([0, 1, 1000]), flags=st.sampled_from([0, RO, 4]))
        def huge_beyond_the_max_gfn(self, slot: int, pages: int, back: int, flags: int) -> None:
            # ends above the max gfn: x86 prepare refuses it before allocating (no LOG_DIRTY,
            # whose bitmap KVM would allocate first)
            gpa = (limits.max_gfn + 1 - back) * PAGE
            self.pair.set(slot, flags, gpa, pages * PAGE, 0x10000)

        @rule(data=st.data(), pick_existing=st.sampled_from([True, True, False]))
        def get_dirty_log(self, data: st.DataObject, pick_existing: bool) -> None:
            if pick_existing and self.pair.shadow:
                slot = self._existing(data, want_log=True).slot
            else:
                slot = data.draw(S["slot"])
            self.pair.get(slot)

        @rule(data=st.data(), pick_existing=st.sampled_from([True, True, True, False]),
              pattern=st.sampled_from(["zeros", "ones", "first", "random"]),
              seed=st.integers(0, 1 << 32))
        def clear_dirty_log(self, data: st.DataObject, pick_existing: bool, pattern: str,
                            seed: int) -> None:
            if pick_existing and self.pair.shadow:
                s = self._existing(data, want_log=True)
                slot, npages = s.slot, s.npages
            else:
                slot, npages = data.draw(S["slot"]), data.draw(st.sampled_from([0, 64, 70]))
            up = -(-npages // 64) * 64
            words = list(range(0, npages + 1, 64))[:8]
            first = data.draw(_weighted(
                (3, st.sampled_from(words)),
                (2, st.sampled_from([1, 32, 63, npages, up, up + 64, max(0, up - 64),
                                     U64_END - 64])),
            ))
            rest = max(0, npages - first)
            num = data.draw(_weighted(
                (3, st.sampled_from([rest, rest & ~63, 0, 64])),
                (2, st.sampled_from([1, 32, 63, 65, 70, 128, rest + 1, max(0, rest - 1),
                                     rest + 64, -(-rest // 64) * 64])),
            ))
            self.pair.clear(slot, first, num, _bitmap(pattern, seed, num))

        @rule(args0=st.sampled_from([0, 1, 3, 0, 1, 3, 2, 4, 5, 7, 1 << 63]),
              flags=st.sampled_from([0, 0, 0, 0, 1, 2, 1 << 31]))
        def enable_manual_protect(self, args0: int, flags: int) -> None:
            self.pair.enable(args0, flags)

    return DifferentialMachine


def test_random_calls_agree_with_kvm(kvm: Kvm, limits: HostLimits, regions: list[int]) -> None:
    examples = int(os.environ.get("KVMEM_DIFF_EXAMPLES", "800"))
    randomize = os.environ.get("KVMEM_DIFF_RANDOM") == "1"
    machine = make_machine(kvm, limits, regions)
    before = STATS.copy()
    start = time.perf_counter()
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples,
        stateful_step_count=60,
        deadline=None,
        derandomize=not randomize,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    ))
    elapsed = time.perf_counter() - start
    stats = STATS - before
    print(f"\n{stats['calls']} calls compared in {elapsed:.1f} s:")
    for key in sorted(stats):
        print(f"  {key:28} {stats[key]}")
    # the run was big enough and reached every rule
    assert stats["calls"] >= 30 * examples
    missing = [t for t in SOLE_TAGS if not stats[f"sole:{t}"]]
    missing += [k for k in OK_KINDS if not stats[f"ok:{k}"]]
    missing += [k for k in ("set:EEXIST", "get:OK", "get:ENOENT", "get:EINVAL", "get:bits",
                            "clear:OK", "clear:ENOENT", "clear:EINVAL", "enable:OK",
                            "enable:EINVAL", f"huge:{MAX_NR_PAGES}") if not stats[k]]
    assert not missing, f"the random calls never reached: {missing}"
