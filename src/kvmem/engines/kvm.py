"""The KVM engine: kvmem's slots mirrored into a real `/dev/kvm` VM, guests run by KVM_RUN.

Rules of this room:
- The mirror (`_pieces`: kvmem slot → the KVM slots standing for it) changes only under
  `_lock`, in the order kvmem commits changes. A kvmem slot is one KVM slot, except where
  gfns are write-tracked: each tracked run becomes a read-only KVM slot of its own, so a
  guest write there exits (KVM_EXIT_MMIO) and kvmem performs it (DESIGN path 5). KVM slot
  ids are the engine's own: a split needs more ids than kvmem's slot has.
- A change that KVM cannot apply in one ioctl — a kvmem transaction, a split for tracking,
  a merge back — is applied with every vCPU out of KVM_RUN: `_pause` sets `immediate_exit`
  and signals each vCPU thread (QEMU's kick), waits until none is inside KVM_RUN, and
  holds them at the gate until `_resume`. KVM's own single-ioctl semantics cover a single
  `set_memory_region`, which is applied as it is: the naive baseline of the demo.
- guest_memfd slots are bound with KVM_SET_USER_MEMORY_REGION2 to the real guest_memfd
  behind kvmem's file; KVM refuses them read-only, so a tracked gfn there is a hole
  (no KVM slot) whose reads and writes exit and kvmem performs.
- Dirty log = KVM's bits ∪ kvmem's bitmap. KVM's bits are moved, never copied: read them
  (KVM_GET_DIRTY_LOG), OR them into kvmem's bitmap, only then clear them in KVM
  (KVM_CLEAR_DIRTY_LOG with manual protect). A failure at any step loses nothing; bits
  end up in kvmem's bitmap, whose own harvest rules (manual protect or not) apply.
- A KVM slot that logs is never deleted before its bits are folded into kvmem's bitmap
  (transactions fold in `slots_updating`, single deletes in `slots_invalidated`).
- Dirty rings: enabled on KVM's VM with kvmem's (`dirty_ring_enable`, before any vCPU).
  The guest's entries are KVM's, in the ring mapped from each vCPU fd; `vcpu.dirty_ring`
  harvests them after kvmem's own (what kvmem wrote for the vCPU), translated from the
  engine's KVM slots to kvmem's slots and offsets; a reset is kvmem's walk plus
  KVM_RESET_DIRTY_RINGS. KVM keeps no bitmaps then: nothing is folded.
- Where the user keeps bitmaps, the engine still takes the guest's writes from KVM's rings
  when KVM has them (its *own* rings, `OWN_RING_BYTES` per vCPU, enabled before the first
  vCPU): reading a bitmap's worth of KVM_GET_DIRTY_LOG scans the whole slot (1.15 ms per
  GiB), a ring costs what was written. `_drain` moves every entry into kvmem's bitmap of
  its slot (where the slot logs) and the restore log (while armed), then resets KVM's
  rings, which write-protects the pages again; it runs before every read of a bitmap and
  every mirror change, and when a ring fills (DIRTY_RING_FULL never reaches the user). The
  entries are moved, never copied: a failure loses nothing a later drain cannot find.
- With the user's rings on and the restore log armed, a snapshot or restore drains KVM's
  rings too: the entries go to the restore log and wait in `_pending` for the user's
  harvest; KVM's reset happens then (their pages are write-protected at once, and
  `reset_dirty_rings` later counts only kvmem's own entries of them).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import host, sync
from ..cpu import PagingFeatures, Sregs, VcpuState, kvm_state
from ..cpu.paging import INVALID_GPA
from ..dirty import RingReader
from ..errors import KvmError
from ..gmem import GuestMemfd
from ..host import HostMemory
from ..kvmapi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM,
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    Kvm,
    KvmIo,
    KvmRegs,
    KvmSegment,
    KvmVcpu,
    probe_phys_bits,
)
from ..uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from . import AttachedOnce, EngineCapabilities, EngineError, Exit, ExitKind, Regs

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..slots import Change, MemorySlot
    from ..vm import Vcpu, Vm

__all__ = ["KICK_SIGNAL", "OWN_RING_BYTES", "KvmEngine", "KvmEngineVcpu",
           "install_kick_handler"]

# 65,536 entries per vCPU (KVM's largest ring): a DIRTY_RING_FULL drain per ~65,000 pages.
# Large because KVM pushes while it emulates one instruction and checks for a full ring only
# before the next: a `rep stos` emulated here (kvm_pvm emulates ring-0 code, and logs every
# write it emulates) may push one entry per byte, and a ring it overflows is wedged.
OWN_RING_BYTES = 1 << 20

KICK_SIGNAL = signal.SIGUSR1  # QEMU's SIG_IPI
_USER_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's handler: its only job is to exist, so the signal interrupts KVM_RUN."""


def install_kick_handler() -> None:
    """Install the kick signal's handler (done by the first engine; a program that creates
    engines outside the main thread calls this from the main thread first)."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return  # any handler interrupts KVM_RUN; keep the one installed
    if threading.current_thread() is not threading.main_thread():
        raise EngineError(errno.EINVAL, f"the first KVM engine must be created in the main "
                                        f"thread: it installs the {KICK_SIGNAL.name} handler "
                                        "that kicks vCPUs out of KVM_RUN")
    signal.signal(KICK_SIGNAL, _ignore_kick)


@dataclass(frozen=True, slots=True)
class _Piece:
    """One KVM slot standing for [gfn, gfn + npages) of a kvmem slot."""

    kvm_slot: int  # (as_id << 16) | the engine's id
    gfn: int
    npages: int
    hva: int
    flags: int


def _flat(selector: int, type_: int) -> KvmSegment:
    return KvmSegment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1,
                      dpl=0, db=1, s=1, l=0, g=1)


class KvmEngine(AttachedOnce):
    """kvmem on /dev/kvm. Create with `Vm(engine="kvm")`; reach it as `vm.engine`."""

    name = "kvm"

    def __init__(self) -> None:
        install_kick_handler()
        self._kvm = Kvm()
        try:
            self._fd = self._kvm.create_vm()
            check = self._fd.check_extension
            self._caps = EngineCapabilities(
                name=self.name,
                address_spaces=max(1, check(KVM_CAP_MULTI_ADDRESS_SPACE)),
                max_slots=check(KVM_CAP_NR_MEMSLOTS),
                readonly_mem=check(KVM_CAP_READONLY_MEM) > 0,
                dirty_log=True,
                write_tracking=check(KVM_CAP_READONLY_MEM) > 0,
                # measured (no capability says it): slot id 0 is still free here
                phys_bits=probe_phys_bits(self._fd, 0),
                guest_memfd=check(KVM_CAP_GUEST_MEMFD) > 0,
                dirty_ring_max_bytes=check(KVM_CAP_DIRTY_LOG_RING),
            )
            if not check(KVM_CAP_IMMEDIATE_EXIT):
                raise EngineError(errno.ENOSYS, "KVM lacks KVM_CAP_IMMEDIATE_EXIT: vCPUs "
                                                "could not be held out of KVM_RUN")
            # manual protect: reading KVM's log does not clear it, so bits are cleared only
            # once they are safe in kvmem's bitmap
            self._manual = bool(check(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1)
            if self._manual:
                self._fd.enable_manual_dirty_log_protect(initially_set=False)
        except BaseException:
            self._kvm.close()
            raise
        self._vm: Vm | None = None
        self._lock = sync.Mutex("kvm_engine.mirror")
        self._gate_lock = sync.Mutex("kvm_engine.gate")
        self._gate = sync.Condition(self._gate_lock)
        self._paused = 0
        self._batch_paused = False
        self._broken: str | None = None
        self._pieces: dict[tuple[int, int], list[_Piece]] = {}
        self._split: list[set[int]] = [set() for _ in range(self._caps.address_spaces)]
        self._free_ids: list[list[int]] = [[] for _ in range(self._caps.address_spaces)]
        self._next_id = [0] * self._caps.address_spaces
        self._vcpus: list[KvmEngineVcpu] = []
        self._ring_size = 0  # KVM's dirty ring per vCPU, in bytes (0: bitmaps)
        self._own_ring = 0  # ... enabled by the engine for itself (the user keeps bitmaps)
        self._reset_owed = False  # a drain harvested entries KVM has not reset yet
        # KVM slot → (kvmem slot, gfn of the piece - base gfn of the kvmem slot): how an
        # entry of KVM's ring reads in kvmem's terms. Kept after a piece goes, as KVM's
        # entries keep the old slot: a reused id reads stale entries anew, as in KVM.
        self._ring_slots: dict[int, tuple[int, int]] = {}
        self.stats = {"ioctls": 0, "pauses": 0, "kicks": 0, "tracked_writes": 0,
                      "dirty_folds": 0, "splits": 0, "translation_flushes": 0}
        self._scratch: HostMemory | None = None  # a page for `guest_tables_restored`
        self._paused_block = _Paused(self)

    def attach(self, vm: Vm) -> None:
        self._claim(vm)
        with vm.slots_lock, self._lock:
            for as_id in range(vm.address_spaces):
                for s in vm.slot_set(as_id):
                    self._install(s)
        vm.add_listener(self)

    # -- vCPUs --------------------------------------------------------------------------------
    def create_vcpu_backend(self, vcpu: Vcpu) -> KvmEngineVcpu:
        if self._vm is not vcpu.vm:
            raise EngineError(errno.EINVAL, f"{vcpu!r} is not a vCPU of this engine's Vm")
        own = min(OWN_RING_BYTES, self._caps.dirty_ring_max_bytes)
        if not self._ring_size and not self._own_ring and not self._vcpus and own >= 1 << 16:
            # before the first vCPU, as KVM requires: the engine's own rings (see the rules)
            self._fd.enable_dirty_ring(own)
            self.stats["ioctls"] += 1
            self._own_ring = own
        fd = self._fd.create_vcpu(vcpu.id)
        try:
            ring: RingReader | None = None
            if self._ring_size or self._own_ring:
                ring = RingReader(fd.map_dirty_ring(self._ring_size or self._own_ring))
            # every CPUID leaf KVM offers: without them KVM refuses the EFER bits and MSRs
            # of a state taken on another engine (kvm_state.setup_cpuid)
            cpuid = kvm_state.setup_cpuid(self._kvm, fd)
        except BaseException:
            fd.close()
            raise
        cpu = KvmEngineVcpu(self, vcpu, fd, kvm_state.paging_features(cpuid), ring)
        if self._ring_size:
            vcpu.dirty_ring.attach(lambda: self._ring_entries(cpu))
        with self._gate_lock:
            self._vcpus.append(cpu)
        return cpu

    def create_guest_memfd(self, size: int, flags: int) -> int:
        """A real guest_memfd of this engine's VM (KVM_CREATE_GUEST_MEMFD): kvmem's file
        keeps its pages there, so KVM's slots can bind it and KVM's own stage-2 maps them."""
        try:
            return self._fd.create_guest_memfd(size, flags)
        except OSError as e:
            raise KvmError(e.errno or errno.EIO, f"KVM_CREATE_GUEST_MEMFD: {e}") from None

    def close(self) -> None:
        vm, self._vm = self._vm, None
        if vm is not None:
            with contextlib.suppress(ValueError):
                vm.remove_listener(self)
        with self._gate_lock:
            self._broken = self._broken or "engine closed"
            self._gate.notify_all()
        for cpu in self._vcpus:
            cpu.kick()
            cpu._fd.close()
        self._fd.close()
        self._kvm.close()
        if self._scratch is not None:
            self._scratch.close()

    # -- holding vCPUs out of KVM_RUN ----------------------------------------------------------
    def _pause(self) -> None:
        """Kick every vCPU out of KVM_RUN and keep it out until `_resume`."""
        with self._gate_lock:
            self._paused += 1
            self.stats["pauses"] += 1
            running = False
            for cpu in self._vcpus:
                if cpu._in_run:
                    cpu._interrupt()
                    running = True
            if not running:
                return  # none is inside, and the gate (held here) keeps them out now
            # a vCPU inside KVM_RUN leaves it at once: immediate_exit covers a signal that
            # arrived before it entered
            self._gate.wait_until(lambda: not any(c._in_run for c in self._vcpus))

    def _resume(self) -> None:
        with self._gate_lock:
            self._paused -= 1
            self._gate.notify_all()

    def paused(self) -> _Paused:
        """No vCPU is inside KVM_RUN in the block (`Engine.paused`)."""
        return self._paused_block

    # -- the mirror ---------------------------------------------------------------------------
    def _alloc_id(self, as_id: int) -> int:
        free = self._free_ids[as_id]
        if free:
            return free.pop()
        sid = self._next_id[as_id]
        if sid >= self._caps.max_slots:
            raise EngineError(errno.ENOSPC, f"KVM has no free slot id in address space "
                                            f"{as_id} ({self._caps.max_slots} in all)")
        self._next_id[as_id] = sid + 1
        return sid

    def _set(self, kvm_slot: int, flags: int, gfn: int, npages: int, hva: int,
             gmem: tuple[int, int] | None = None) -> None:
        """One slot ioctl; `gmem` = (guest_memfd fd, offset) for a KVM_MEM_GUEST_MEMFD slot,
        which only KVM_SET_USER_MEMORY_REGION2 can create."""
        try:
            if gmem is None:
                self._fd.set_user_memory_region(kvm_slot, flags, gfn << PAGE_SHIFT,
                                                npages << PAGE_SHIFT, hva)
            else:
                self._fd.set_user_memory_region2(kvm_slot, flags, gfn << PAGE_SHIFT,
                                                 npages << PAGE_SHIFT, hva, gmem[1], gmem[0])
        except OSError as e:
            self._broken = f"KVM refused slot {kvm_slot:#x} gfn {gfn:#x}+{npages}: {e}"
            with self._gate_lock:
                self._gate.notify_all()
            raise EngineError(e.errno or errno.EIO, self._broken) from None
        self.stats["ioctls"] += 1

    def _tracked_in(self, s: MemorySlot) -> list[int]:
        """The write-tracked gfns of `s` that its KVM slots must not map writable."""
        if s.readonly:
            return []
        return [g for g in self.vm.page_track.tracked_gfns(s.as_id)
                if s.base_gfn <= g < s.end_gfn]

    def _plan(self, s: MemorySlot) -> list[tuple[int, int, int, int]]:
        """(gfn, npages, hva, flags) of the KVM slots for kvmem slot `s`: tracked gfns of a
        writable slot become read-only pieces of their own. KVM refuses a read-only
        guest_memfd slot, so there they become holes instead: every access exits
        (KVM_EXIT_MMIO) and kvmem performs it (`_decode`)."""
        flags = s.flags & _USER_FLAGS
        if self.vm.memslots.restore_log.armed and not s.readonly and s.gmem is None:
            flags |= KVM_MEM_LOG_DIRTY_PAGES  # KVM logs for the restore log too
        tracked = self._tracked_in(s)
        out: list[tuple[int, int, int, int]] = []
        if s.gmem is not None:
            pos = s.base_gfn
            for g in [*tracked, s.end_gfn]:
                if g > pos:
                    out.append((pos, g - pos, s.hva_of(pos), flags | KVM_MEM_GUEST_MEMFD))
                pos = g + 1
            return out
        pos = s.base_gfn
        i = 0
        while i < len(tracked):
            lo = tracked[i]
            hi = lo + 1
            while i + 1 < len(tracked) and tracked[i + 1] == hi:
                i += 1
                hi += 1
            i += 1
            if lo > pos:
                out.append((pos, lo - pos, s.hva_of(pos), flags))
            out.append((lo, hi - lo, s.hva_of(lo), flags | KVM_MEM_READONLY))
            pos = hi
        if pos < s.end_gfn:
            out.append((pos, s.end_gfn - pos, s.hva_of(pos), flags))
        return out

    def _install(self, s: MemorySlot) -> None:
        self._lock.assert_held()
        pieces = []
        fd = None
        if s.gmem is not None:
            file = s.gmem.file
            assert isinstance(file, GuestMemfd)
            fd = file.fd
            # the holes of tracked gfns (see `_plan`)
            self._split[s.as_id].update(self._tracked_in(s))
        for gfn, npages, hva, flags in self._plan(s):
            sid = self._alloc_id(s.as_id)
            kvm_slot = (s.as_id << 16) | sid
            gmem = None
            if s.gmem is not None and fd is not None:
                gmem = (fd, s.gmem.offset + ((gfn - s.base_gfn) << PAGE_SHIFT))
            self._set(kvm_slot, flags, gfn, npages, hva, gmem)
            pieces.append(_Piece(kvm_slot, gfn, npages, hva, flags))
            self._ring_slots[kvm_slot] = (s.slot, gfn - s.base_gfn)
            if flags & KVM_MEM_READONLY and not s.readonly:
                self._split[s.as_id].update(range(gfn, gfn + npages))
        self._pieces[(s.as_id, s.id)] = pieces

    def _remove(self, s: MemorySlot) -> None:
        self._lock.assert_held()
        for p in self._pieces.pop((s.as_id, s.id), []):
            self._set(p.kvm_slot, 0, 0, 0, 0)
            self._free_ids[s.as_id].append(p.kvm_slot & 0xFFFF)
            if p.flags & KVM_MEM_READONLY:
                self._split[s.as_id].difference_update(range(p.gfn, p.gfn + p.npages))
        if s.gmem is not None:  # its holes
            split = self._split[s.as_id]
            split.difference_update([g for g in split if s.base_gfn <= g < s.end_gfn])

    def _replace(self, old: MemorySlot, new: MemorySlot) -> None:
        """MOVE / FLAGS_ONLY: one ioctl on the same KVM slot where neither side is split
        (KVM keeps its dirty bitmap across a flags change, as kvmem does)."""
        self._lock.assert_held()
        self._fold(old)  # bits KVM holds for the restore log alone stay out of a new bitmap
        pieces = self._pieces.get((old.as_id, old.id), [])
        plan = self._plan(new)
        if len(pieces) == 1 and len(plan) == 1:
            gfn, npages, hva, flags = plan[0]
            kvm_slot = pieces[0].kvm_slot
            self._set(kvm_slot, flags, gfn, npages, hva)
            self._ring_slots[kvm_slot] = (new.slot, gfn - new.base_gfn)
            del self._pieces[(old.as_id, old.id)]
            self._pieces[(new.as_id, new.id)] = [_Piece(kvm_slot, gfn, npages, hva, flags)]
            return
        self._remove(old)
        self._install(new)

    def _apply(self, changes: Sequence[Change]) -> None:
        with self._lock:
            for c in changes:
                if c.old is not None and c.new is not None:
                    self._replace(c.old, c.new)  # MOVE, FLAGS_ONLY: KVM's own change kinds
                elif c.old is not None:
                    self._remove(c.old)
                elif c.new is not None:
                    self._install(c.new)

    # -- dirty log ----------------------------------------------------------------------------
    def _fold(self, s: MemorySlot) -> None:
        """Move KVM's dirty bits of kvmem slot `s` into its bitmap and, while it is armed,
        the restore log (see the rules above). With rings on KVM keeps no bitmaps
        (GET_DIRTY_LOG is ENXIO): nothing to fold."""
        bitmap = s.dirty_bitmap
        log = self.vm.memslots.restore_log
        if self._own_ring or (self._ring_size and log.armed):
            self._drain()  # every slot's entries at once: what one costs
            return
        if (bitmap is None and not log.armed) or self._ring_size:
            return
        for p in self._pieces.get((s.as_id, s.id), []):
            if not p.flags & KVM_MEM_LOG_DIRTY_PAGES:
                continue
            bits = self._fd.get_dirty_log(p.kvm_slot, p.npages)
            self.stats["ioctls"] += 1
            if bits.count(0) == len(bits):
                continue
            if bitmap is not None:
                bitmap.merge_bytes(bits, 0, p.gfn - s.base_gfn, p.npages)
            if log.armed:
                for i in np.flatnonzero(np.unpackbits(np.frombuffer(bits, dtype=np.uint8),
                                                      bitorder="little")[:p.npages]).tolist():
                    log.mark(s.as_id, p.gfn + i, p.hva + (i << PAGE_SHIFT), 1)
            self.stats["dirty_folds"] += 1
            if self._manual:
                self._fd.clear_dirty_log(p.kvm_slot, 0, p.npages, bits)
                self.stats["ioctls"] += 1

    # -- dirty rings ----------------------------------------------------------------------------
    def dirty_ring_enable(self, vm: Vm, nbytes: int, acq_rel: bool) -> None:
        try:
            self._fd.enable_dirty_ring(nbytes, acq_rel)
        except OSError as e:
            raise KvmError(e.errno or errno.EIO, f"KVM refused the dirty ring: {e}") from None
        self.stats["ioctls"] += 1
        self._ring_size = nbytes

    def dirty_rings_reset(self, vm: Vm) -> int:
        """KVM_RESET_DIRTY_RINGS: KVM frees the entries harvested from its rings and
        write-protects their pages in its own stage-2."""
        self.stats["ioctls"] += 1
        return self._fd.reset_dirty_rings()

    def _drain(self) -> bool:
        """Take every entry of KVM's rings: into kvmem's bitmaps (own rings) or the user's
        `_pending` entries (the user's rings), and into the restore log while it is armed;
        then reset KVM's rings (see the rules above). True if KVM freed any entry."""
        self._lock.assert_held()
        taken = False
        user_rings = self._ring_size
        for cpu in self._vcpus:
            ring = cpu._ring
            if ring is None:
                continue
            entries = ring.harvest()
            if not entries:
                continue
            taken = True
            if user_rings:
                cpu._pending += entries
            self._route(entries, not user_rings)
        if taken or self._reset_owed:
            # owed until it succeeds: harvested entries KVM has not reset keep their pages
            # writable, and a later drain would not see them again
            self._reset_owed = True
            self.stats["ioctls"] += 1
            self.stats["dirty_folds"] += 1
            freed = self._fd.reset_dirty_rings()
            self._reset_owed = False
            return freed > 0
        return False

    def _route(self, entries: list[tuple[int, int]], bitmaps: bool) -> None:
        """Mark the pages of KVM ring entries in kvmem's bitmaps (`bitmaps`) and the
        restore log (while armed). An entry of a slot gone since is skipped, as KVM skips
        it."""
        memslots = self.vm.memslots
        log = memslots.restore_log
        armed = log.armed
        ring_slots = self._ring_slots
        sets = memslots.active.value
        # one pass over all entries for the first one's KVM slot: their host pages (the
        # common case: a reset's few dozen entries all fall in one slot); what is left is
        # grouped by KVM slot. One slot lookup and one bulk mark per group, not per entry
        pending: list[tuple[int, list[tuple[int, int]]]] = [(entries[0][0], entries)]
        while pending:
            kvm_slot, group = pending.pop()
            s = None
            where = ring_slots.get(kvm_slot)
            if where is not None:
                value, delta = where
                s = sets[value >> 16].by_id(value & 0xFFFF)
            pages: list[int] = []
            if s is not None:
                lim = s.npages - delta  # offset o is page o + delta of `s`
                base = (s.hva >> PAGE_SHIFT) + delta
                pages = [base + o for k, o in group if k == kvm_slot and o < lim]
                if bitmaps and s.dirty_bitmap is not None:
                    mark, rel = s.dirty_bitmap.mark, delta - base
                    for page in pages:
                        mark(page + rel)
                if armed and pages:
                    # in a read section of the host guard, as `mark_pages` asks (inlined)
                    section = host.guard.current
                    section.append(None)
                    try:
                        log.mark_pages(pages)
                    finally:
                        section.pop()
            if group is entries and len(pages) != len(entries):
                by_slot: dict[int, list[tuple[int, int]]] = {}
                for entry in entries:
                    if entry[0] != kvm_slot:
                        by_slot.setdefault(entry[0], []).append(entry)
                pending += by_slot.items()

    def _ring_entries(self, cpu: KvmEngineVcpu) -> list[tuple[int, int]]:
        """The entries KVM pushed since the last harvest, in kvmem's slots and offsets (the
        user's rings: kept by a drain first, then the ring's)."""
        assert cpu._ring is not None
        with self._lock:
            fresh = cpu._ring.harvest()
            if fresh:
                self._route(fresh, bitmaps=False)
            out, cpu._pending = cpu._pending + fresh, []
        ring_slots = self._ring_slots
        for i, (kvm_slot, offset) in enumerate(out):
            where = ring_slots.get(kvm_slot)
            if where is not None:
                out[i] = (where[0], offset + where[1])
        return out

    def dirty_log_sync(self, vm: Vm, slot: MemorySlot) -> None:
        with self._lock:
            self._fold(slot)

    def restore_log_sync(self, vm: Vm) -> None:
        with self._lock:
            if self._own_ring or (self._ring_size and vm.memslots.restore_log.armed):
                self._drain()  # every slot's entries at once (what `_fold` of each does)
                return
            for as_id in range(vm.address_spaces):
                for s in vm.slot_set(as_id):
                    self._fold(s)

    def guest_tables_restored(self, vm: Vm) -> None:
        # KVM keeps the translations it built from guest page tables (its shadow pages, the
        # guest's TLB) until the guest writes a table — which it sees — or a slot goes; a
        # host copy into a table it does not see. Deleting a slot drops them all (x86's
        # kvm_arch_flush_shadow_memslot zaps every shadow page, and flushes the TLBs): one
        # page of the engine's own, made past every slot of address space 0 and deleted.
        with self._lock:
            if self._scratch is None:
                self._scratch = HostMemory.anonymous(PAGE_SIZE)
            gfn = max((p.gfn + p.npages for pieces in self._pieces.values() for p in pieces
                       if p.kvm_slot >> 16 == 0), default=0)
            sid = self._alloc_id(0)
            try:
                self.stats["ioctls"] += 2
                self._set(sid, 0, gfn, 1, self._scratch.hva)
                self._set(sid, 0, 0, 0, 0)
            finally:
                self._free_ids[0].append(sid)
            self.stats["translation_flushes"] += 1

    def restore_log_armed(self, vm: Vm) -> None:
        # every writable slot logs in KVM from now on (one FLAGS_ONLY ioctl per KVM slot,
        # which write-protects it; vCPUs are held out of KVM_RUN by the caller)
        with self._lock:
            for as_id in range(vm.address_spaces):
                for s in vm.slot_set(as_id):
                    self._replace(s, s)

    # -- Vm listener --------------------------------------------------------------------------
    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None:
        with self._lock:
            self._fold(slot)

    def slots_updating(self, vm: Vm, changes: Sequence[Change]) -> None:
        # the guest must see the batch at once: no vCPU runs from here until committed
        self._pause()
        self._batch_paused = True
        with self._lock:
            for c in changes:
                if c.old is not None:
                    self._fold(c.old)

    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        paused, self._batch_paused = self._batch_paused, False
        try:
            self._apply(changes)
        finally:
            if paused:
                self._resume()

    def track_changed(self, vm: Vm, as_id: int, gfn: int, tracked: bool) -> None:
        """Split the gfn out of its KVM slot into a read-only one (0→1), or merge it back
        (1→0) — atomically for the guest."""
        with vm.slots_lock:
            s = vm.slot_set(as_id).search(gfn)
            if s is None or s.invalid or s.readonly:
                return
            with self._lock:
                have = [(p.gfn, p.npages, p.hva, p.flags)
                        for p in self._pieces.get((s.as_id, s.id), [])]
                if have == self._plan(s):
                    return
            self._pause()
            try:
                with self._lock:
                    self._fold(s)
                    self._remove(s)
                    self._install(s)
                    self.stats["splits"] += 1
            finally:
                self._resume()

    def split_covers(self, as_id: int, gfn: int) -> bool:
        """`gfn` is mirrored read-only because kvmem tracks writes to it."""
        return gfn in self._split[as_id]


class _Paused:
    """`with engine.paused():` — `_pause` on entry, `_resume` on exit; one per engine,
    reusable and reentrant (a pause is a count), cheaper than a generator (a reset pauses
    once)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: KvmEngine) -> None:
        self._engine = engine

    def __enter__(self) -> None:
        self._engine._pause()

    def __exit__(self, *exc: object) -> None:
        self._engine._resume()


class KvmEngineVcpu:
    """The KVM half of a `kvmem.Vcpu` (its backend): a /dev/kvm vCPU. `run` and friends
    from one thread; `kick` from any."""

    def __init__(self, engine: KvmEngine, vcpu: Vcpu, fd: KvmVcpu,
                 features: PagingFeatures, ring: RingReader | None = None) -> None:
        self._engine = engine
        self._vcpu = vcpu
        self._fd = fd
        self._features = features
        self._ring = ring  # KVM's dirty ring of this vCPU (the user's or the engine's own)
        self._pending: list[tuple[int, int]] = []  # drained for the user's harvest
        self._prepared: kvm_state.Prepared | None = None  # the last state loaded, packed
        self._in_run = False
        self._thread = 0
        self._kicked = False
        self._pending_io: KvmIo | None = None
        self._pending_mmio = 0  # length of an MMIO read awaiting its data
        self._last: Exit | None = None

    # -- registers ----------------------------------------------------------------------------
    def start(self, entry: int, regs: Regs | None = None) -> None:
        sregs = self._fd.get_sregs()
        sregs.cs = _flat(0x08, 11)  # execute/read, accessed
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat(0x10, 3))  # read/write, accessed
        sregs.cr0 = 0x11  # PE | ET: protected mode, no paging
        sregs.cr4 = 0
        sregs.efer = 0
        self._fd.set_sregs(sregs)
        r = regs if regs is not None else Regs()
        self.set_regs(Regs(r.eax, r.ebx, r.ecx, r.edx, r.esi, r.edi, r.esp, r.ebp, entry, 0x2))

    def get_regs(self) -> Regs:
        k = self._fd.get_regs()
        m = 0xFFFF_FFFF
        return Regs(k.rax & m, k.rbx & m, k.rcx & m, k.rdx & m, k.rsi & m, k.rdi & m,
                    k.rsp & m, k.rbp & m, k.rip & m, k.rflags & m)

    def set_regs(self, regs: Regs) -> None:
        """At any exit. At an IN or MMIO read the registers are those before the instruction,
        and setting them drops the read: the instruction runs again from them (KVM would
        finish it on the registers set and lose the answer)."""
        if self._pending_io is not None or self._pending_mmio:
            self._answer_unanswered()
            kvm_state.settle(self._fd)
        self._fd.set_regs(KvmRegs(rax=regs.eax, rbx=regs.ebx, rcx=regs.ecx, rdx=regs.edx,
                                  rsi=regs.esi, rdi=regs.edi, rsp=regs.esp, rbp=regs.ebp,
                                  rip=regs.eip, rflags=regs.eflags))

    # -- running ------------------------------------------------------------------------------
    def complete(self, data: bytes) -> None:
        if self._last is None or not (self._pending_io is not None or self._pending_mmio):
            raise EngineError(errno.EINVAL, "no read exit is waiting for data")
        self._answer(self._last.check_answer(data))

    def _answer(self, data: bytes) -> None:
        """Put the answer of the pending read in the run page (KVM takes it at the next
        KVM_RUN)."""
        if self._pending_io is not None:
            self._fd.set_io_data(self._pending_io, data)
            self._pending_io = None
        elif self._pending_mmio:
            self._fd.set_mmio_data(data)
            self._pending_mmio = 0

    def _answer_unanswered(self) -> None:
        """An unanswered read reads zeros."""
        if self._last is not None and (self._pending_io is not None or self._pending_mmio):
            self._answer(bytes(self._last.answer_size))

    # -- the whole state ------------------------------------------------------------------------
    def get_state(self) -> VcpuState:
        """The vCPU's whole state (`kvmem.cpu.VcpuState`). At an IN or MMIO read exit the
        instruction is finished first, with the answer given (zeros if none)."""
        self._answer_unanswered()
        return kvm_state.get_state(self._fd)

    def set_state(self, state: VcpuState) -> None:
        """Load `state`; a pending read is finished on the old state first (as `get_state`).
        The last state loaded stays packed: loading that same object again (a snapshot's,
        restored once per fuzz input) skips the packing and KVM's mode check."""
        if self._pending_io is not None or self._pending_mmio:
            self._answer_unanswered()
        p = self._prepared
        if p is not None and p.state is state:
            kvm_state.load(self._fd, p, checked=True)
            return
        p = kvm_state.prepare(self._fd, state)
        kvm_state.load(self._fd, p)
        self._prepared = p

    # -- page walks ------------------------------------------------------------------------------
    def paging_registers(self) -> tuple[Sregs, int]:
        return kvm_state.get_sregs(self._fd), self._fd.get_regs().rflags

    @property
    def paging_features(self) -> PagingFeatures:
        return self._features

    def translate(self, gva: int) -> int:
        """KVM_TRANSLATE (a supervisor read; INVALID_GPA where KVM finds no translation)."""
        t = self._fd.translate(gva)
        return t.physical_address if t.valid else INVALID_GPA

    def _interrupt(self) -> None:
        """Under the engine's gate: make KVM_RUN return now, or at once when entered."""
        self._fd.immediate_exit = True
        if self._in_run:
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def kick(self) -> None:
        eng = self._engine
        with eng._gate_lock:
            self._kicked = True
            eng.stats["kicks"] += 1
            if not self._fd.closed:
                self._interrupt()
            eng._gate.notify_all()

    def run(self) -> Exit:
        # the vCPU is loaded while it runs: what kvmem writes for it (a tracked write) is
        # marked in its ring
        with self._vcpu.loaded():
            return self._run()

    def _run(self) -> Exit:
        self._answer_unanswered()
        eng = self._engine
        while True:
            # KVM keeps a vCPU with a soft-full ring out of the guest; kvmem's own ring of
            # the vCPU (its writes for the guest) counts as much as KVM's
            if self._vcpu.dirty_ring.check_request():
                return Exit(ExitKind.DIRTY_RING_FULL)
            with eng._gate_lock:
                eng._gate.wait_until(lambda: not eng._paused or self._kicked
                                   or eng._broken is not None)
                if self._kicked:
                    self._kicked = False
                    self._fd.immediate_exit = False
                    return Exit(ExitKind.KICKED)
                if eng._broken is not None:
                    raise EngineError(errno.EIO, f"KVM engine stopped: {eng._broken}")
                self._fd.immediate_exit = False
                self._in_run = True
                self._thread = threading.get_ident()
            try:
                reason = self._fd.run()
            except OSError as e:
                if e.errno not in (errno.EINTR, errno.EAGAIN):
                    raise
                reason = KVM_EXIT_INTR
            finally:
                with eng._gate_lock:
                    self._in_run = False
                    eng._gate.notify_all()
            if reason == KVM_EXIT_INTR:
                continue  # a kick or a pause: the gate decides
            exit_ = self._decode(reason)
            if exit_ is not None:
                self._last = exit_
                return exit_

    def _decode(self, reason: int) -> Exit | None:
        fd = self._fd
        if reason == KVM_EXIT_IO:
            io = fd.io()
            if io.is_write:
                return Exit(ExitKind.IO, io.port, io.size, True, fd.io_data(io), count=io.count)
            self._pending_io = io
            return Exit(ExitKind.IO, io.port, io.size, False, count=io.count)
        if reason == KVM_EXIT_MMIO:
            m = fd.mmio()
            gfn = m.phys_addr >> PAGE_SHIFT
            as_id = self._vcpu.as_id
            if m.is_write and (self._engine.split_covers(as_id, gfn)
                               or self._kvmem_writable(as_id, gfn)):
                # kvmem's slot is writable here, so KVM exited only because of a read-only
                # split — also when the last tracker went and the split merged back after
                # KVM_RUN returned: the write is the guest's, never an MMIO exit to lose
                self._tracked_write(as_id, m.phys_addr, m.data)
                return None
            if m.is_write:
                return Exit(ExitKind.MMIO, m.phys_addr, m.len, True, m.data)
            if self._engine.split_covers(as_id, gfn):
                # a read of a tracked gfn of a guest_memfd slot (a hole in KVM's slots):
                # KVM's emulator would read it through the accessors, so kvmem does
                fd.set_mmio_data(self._vcpu.read(m.phys_addr, m.len))
                return None
            self._pending_mmio = m.len
            return Exit(ExitKind.MMIO, m.phys_addr, m.len, False)
        if reason == KVM_EXIT_HLT:
            return Exit(ExitKind.HLT)
        if reason == KVM_EXIT_DIRTY_RING_FULL:
            if self._engine._own_ring:  # the engine's own ring: drain it and go on
                with self._engine._lock:
                    if self._engine._drain():
                        return None
                # full, yet nothing to harvest: KVM overflowed the ring (more entries in
                # one instruction than it holds) and will not run this vCPU again
                return Exit(ExitKind.INTERNAL_ERROR, detail="KVM's dirty ring overflowed: "
                            "one instruction dirtied more pages than the ring holds")
            return Exit(ExitKind.DIRTY_RING_FULL)
        if reason == KVM_EXIT_SHUTDOWN:
            return Exit(ExitKind.SHUTDOWN)
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub, data = fd.internal_error()
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"suberror {sub} data {data}")
        if reason == KVM_EXIT_FAIL_ENTRY:
            return Exit(ExitKind.INTERNAL_ERROR, detail="entry failed")
        return Exit(ExitKind.INTERNAL_ERROR, detail=f"unexpected exit reason {reason}")

    def _kvmem_writable(self, as_id: int, gfn: int) -> bool:
        slot = self._engine.vm.lookup(gfn, as_id)
        return slot is not None and not slot.invalid and not slot.readonly

    def _tracked_write(self, as_id: int, gpa: int, data: bytes) -> None:
        """A write that hit a read-only split: kvmem performs it (notifying trackers if the
        gfn is still tracked) and the guest goes on."""
        vm = self._engine.vm
        self._engine.stats["tracked_writes"] += 1
        if vm.page_track.is_tracked(gpa >> PAGE_SHIFT, as_id):
            vm.page_track.write(as_id, gpa, data)
        else:
            self._vcpu.write(gpa, data)
