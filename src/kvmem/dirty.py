"""Dirty bitmaps and dirty rings (kvm-semantics §7.1, §7.2, §7.3).

Defines `DirtyBitmap`: one per dirty-logging slot, `ALIGN(npages, 64) / 8` bytes in KVM's
layout (little-endian 64-bit words, bit i = page i of the slot), so `get` returns exactly
the bytes `KVM_GET_DIRTY_LOG` copies out. A 4 GiB slot costs 128 KiB, not a set of ints.
Word-wide operations (harvest, clear by mask) run in NumPy; marking one page is a single
byte operation under the bitmap's lock (KVM's atomic `set_bit`).

The bitmap object belongs to the slot and survives MOVE and LOG_DIRTY on→on FLAGS_ONLY
changes (the new slot takes the same object), as KVM hands `old->dirty_bitmap` over.

Defines `DirtyRing`: one per vCPU of a VM whose dirty ring is enabled, an array of KVM's
16-byte `struct kvm_dirty_gfn` with KVM's indices — push (KVM's side), harvest
(userspace's: `RingReader`, which reads a kernel ring mapped from a vCPU fd the same way)
and the reset walk. Which ring a mark goes to is the ring of the vCPU loaded on the
marking thread (`loaded` / `running_ring`, KVM's kvm_get_running_vcpu); the decision
itself is the accessor layer's (`access.DirtyMarks`).
"""

from __future__ import annotations

import errno
import mmap
import struct
import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from . import sync
from .errors import KvmError

__all__ = ["DirtyBitmap", "DirtyRing", "RestoreLog", "RingReader", "loaded", "running_ring"]


class DirtyBitmap:
    __slots__ = ("_bits", "_lock", "_words", "npages")

    def __init__(self, npages: int, initially_set: bool = False) -> None:
        self.npages = npages
        nwords = (npages + 63) // 64
        self._bits = bytearray(nwords * 8)
        self._words: npt.NDArray[np.uint64] = np.frombuffer(self._bits, dtype="<u8")
        self._lock = sync.Mutex("dirty_bitmap")
        if initially_set:
            self.mark_range(0, npages)

    @property
    def nbytes(self) -> int:
        return len(self._bits)

    def mark(self, rel: int) -> None:
        """Set the bit of page `rel` (slot-relative)."""
        with self._lock:
            self._bits[rel >> 3] |= 1 << (rel & 7)

    def mark_range(self, first: int, count: int) -> None:
        """Set bits [first, first+count)."""
        if count <= 0:
            return
        end = first + count
        with self._lock:
            if count <= 16:
                bits = self._bits
                for rel in range(first, end):
                    bits[rel >> 3] |= 1 << (rel & 7)
                return
            as_bytes = np.frombuffer(self._bits, dtype=np.uint8)
            lo_full = (first + 7) >> 3
            hi_full = end >> 3
            if lo_full < hi_full:
                as_bytes[lo_full:hi_full] = 0xFF
                for rel in range(first, lo_full << 3):
                    self._bits[rel >> 3] |= 1 << (rel & 7)
                for rel in range(hi_full << 3, end):
                    self._bits[rel >> 3] |= 1 << (rel & 7)
            else:
                for rel in range(first, end):
                    self._bits[rel >> 3] |= 1 << (rel & 7)

    def snapshot(self) -> bytes:
        """The live bitmap (GET with manual protect: nothing is cleared)."""
        with self._lock:
            return bytes(self._bits)

    def harvest(self) -> bytes:
        """Atomically take and clear every set bit (GET without manual protect)."""
        with self._lock:
            out = bytes(self._bits)
            self._words[:] = 0
            return out

    def load(self, raw: bytes) -> None:
        """Make the bitmap exactly `raw` (KVM's layout; shorter is padded with zeros): a
        restored snapshot's log."""
        with self._lock:
            n = min(len(raw), len(self._bits))
            self._words[:] = 0
            self._bits[:n] = raw[:n]

    def clear(self, first_page: int, num_pages: int, mask: bytes) -> npt.NDArray[np.uint64]:
        """Clear the bits of `mask` (bit i = page first_page+i) within [first_page,
        first_page+num_pages); return, word by word from `first_page`, the bits that were
        set and are now clear (what KVM re-protects). `first_page` is a multiple of 64."""
        nwords = (num_pages + 63) // 64
        user = np.zeros(nwords, dtype="<u8")
        raw = np.frombuffer(mask[: nwords * 8].ljust(nwords * 8, b"\0"), dtype="<u8")
        user[:] = raw
        tail = num_pages & 63
        if tail:
            user[-1] &= np.uint64((1 << tail) - 1)
        w0 = first_page >> 6
        avail = max(0, min(nwords, len(self._words) - w0))
        with self._lock:
            live = self._words[w0:w0 + avail]
            cleared = live & user[:avail]
            live &= ~user[:avail]
        return cleared

    def merge_from(self, src: DirtyBitmap, src_first: int, dst_first: int, count: int) -> None:
        """OR bits [src_first, src_first+count) of `src` into [dst_first, ...) of this one."""
        if count <= 0:
            return
        with src._lock:
            raw = bytes(src._bits[src_first >> 3:(src_first + count + 7) >> 3])
        self.merge_bytes(raw, src_first & 7, dst_first, count)

    def merge_bytes(self, raw: bytes, first_bit: int, dst_first: int, count: int) -> None:
        """OR `count` bits of `raw` (KVM's layout: bit i of byte j is bit 8j + i), from bit
        `first_bit`, into bits [dst_first, dst_first + count) of this bitmap."""
        if count <= 0:
            return
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[
            first_bit:first_bit + count]
        if not bits.any():
            return
        pad = dst_first & 7
        placed = np.zeros((pad + count + 7) // 8 * 8, dtype=np.uint8)
        placed[pad:pad + count] = bits
        packed = np.packbits(placed, bitorder="little")
        with self._lock:
            dst = np.frombuffer(self._bits, dtype=np.uint8)
            dst[dst_first >> 3:(dst_first >> 3) + len(packed)] |= packed


class RestoreLog:
    """What changed in guest memory since a snapshot: the log `Vm.restore` copies back from.

    It is a second consumer of kvmem's one dirty-marking path, beside the slots' bitmaps,
    and never takes a bit from them: every page marked for a dirty-logging slot's bitmap is
    *also* marked here, and while the log is `armed` every slot counts as logging (the
    accessors mark it, the MMU maps nothing writable before a write fault marks it, an
    engine mirrors every slot with dirty logging on and hands this log its bits).

    Entries are host pages (hva >> 12), because a snapshot's memory is the host memory
    behind its slots: a write through any slot over a page — an alias, a slot moved or
    created since — lands on the same entry, and a restore that first puts the layout back
    finds every changed page by its hva. The gfns written through the stage-2 are kept per
    address space too: those pages may be mapped writable now, and a restore protects them
    again. Host invalidations (discard, remap, close, a VMM's own mmap) are kept as hva
    ranges: the log is a `host.notifiers` listener.

    Marking is O(1) (set insertion); `take` is O(entries): a restore's cost follows what
    changed, not the memory size."""

    __slots__ = ("_lock", "armed", "gfns", "pages", "ranges")

    def __init__(self, address_spaces: int) -> None:
        self.armed = False
        self._lock = sync.Mutex("restore_log")
        self.pages: set[int] = set()
        self.gfns: list[set[int]] = [set() for _ in range(address_spaces)]
        self.ranges: list[tuple[int, int]] = []

    def mark(self, as_id: int, gfn: int, hva: int, count: int) -> None:
        """`count` pages from `gfn` (backed from `hva` on) were written."""
        page = hva >> 12
        if count == 1:
            self.pages.add(page)
            self.gfns[as_id].add(gfn)
            return
        with self._lock:
            self.pages.update(range(page, page + count))
            self.gfns[as_id].update(range(gfn, gfn + count))

    def mark_pages(self, pages: list[int]) -> None:
        """Host pages `pages` were written through an engine's own stage-2 (KVM's ring
        entries, in bulk). No gfn is kept: kvmem's stage-2 maps writable only gfns it
        logged itself since the last `take`."""
        with self._lock:
            self.pages.update(pages)

    def mark_hva(self, start: int, end: int) -> None:
        """Host pages of [start, end) changed behind every slot (a host invalidation, or a
        VMM's write through a raw view it reports)."""
        with self._lock:
            self.ranges.append((start, end))

    # host.InvalidationListener
    def invalidate_range_start(self, start: int, end: int) -> None:
        if self.armed:
            self.mark_hva(start, end)

    def invalidate_range_end(self, start: int, end: int) -> None:
        """The change is recorded at its start."""

    def take(self) -> tuple[set[int], list[set[int]], list[tuple[int, int]]]:
        """Everything logged so far, and an empty log in its place."""
        with self._lock:
            out = (self.pages, self.gfns, self.ranges)
            self.pages = set()
            self.gfns = [set() for _ in out[1]]
            self.ranges = []
            return out
# ------------------------------------------------------------------------------------------
# The dirty ring (kvm-semantics §7.3)

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
KVM_DIRTY_GFN_SIZE = 16  # struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}
_GFN = struct.Struct("<IIQ")
_FLAGS = struct.Struct("<I")


def ring_entries(ring: bytearray | mmap.mmap | memoryview) -> int:
    return len(ring) // KVM_DIRTY_GFN_SIZE


class RingReader:
    """Userspace's side of one ring of `struct kvm_dirty_gfn` entries — kvmem's own ring
    or the kernel's, mapped from a vCPU fd (the layout is the same): from a persistent
    fetch index, take every entry whose flags say DIRTY and flag it RESET (harvested), in
    order, stopping at the first that is not. What it costs follows the entries taken,
    never the size of the ring or of guest memory. x86 is TSO: a plain load of `flags`
    before the loads of `slot`/`offset`, and a plain store of RESET after them, are the
    acquire and release the ACQ_REL protocol asks for."""

    __slots__ = ("_buf", "_mask", "fetch_index")

    def __init__(self, buf: bytearray | mmap.mmap) -> None:
        n = ring_entries(buf)
        if n & (n - 1):
            raise ValueError(f"a dirty ring has a power-of-two number of entries, not {n}")
        self._buf = buf
        self._mask = n - 1
        self.fetch_index = 0

    def harvest(self) -> list[tuple[int, int]]:
        buf, mask, unpack, pack = self._buf, self._mask, _GFN.unpack_from, _FLAGS.pack_into
        out: list[tuple[int, int]] = []
        i = self.fetch_index
        while True:
            at = (i & mask) * KVM_DIRTY_GFN_SIZE
            flags, slot, offset = unpack(buf, at)
            if flags != KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((slot, offset))
            pack(buf, at, KVM_DIRTY_GFN_F_RESET)
            i += 1
        self.fetch_index = i
        return out


class DirtyRing:
    """One vCPU's dirty ring, KVM's side and userspace's (KVM's `struct kvm_dirty_ring`).

    `push` is KVM's (a mark of a page while this vCPU is loaded): write slot and offset,
    then flags = DIRTY, `dirty_index++`; reaching the soft limit raises the request that
    makes the vCPU exit with KVM_EXIT_DIRTY_RING_FULL before it enters the guest again.
    `harvest` is userspace's (`RingReader`). `reset` is KVM_RESET_DIRTY_RINGS' walk: from
    `reset_index`, every entry userspace flagged RESET becomes free, batched by slot into
    64-page masks for the caller to write-protect again. `entries` is 0 on a VM without
    rings: every call but `harvest` (EINVAL) and `check_request` is then a no-op.

    An engine whose own rings hold the guest's entries (KVM's, mapped from the vCPU fd)
    adds its reader with `attach`: `harvest` takes those entries too, after kvmem's own.

    All of it runs under `lock` (the vCPU's: KVM pushes from the vCPU's own context and
    resets under slots_lock; kvmem's pushes come from any thread that loaded the vCPU)."""

    __slots__ = ("_buf", "_kernel", "_reader", "dirty_index", "entries", "lock", "overflows",
                 "owner", "request", "reset_index", "soft_limit", "vcpu_id")

    def __init__(self, nbytes: int, vcpu_id: int = 0, owner: object = None,
                 reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES) -> None:
        self.entries = nbytes // KVM_DIRTY_GFN_SIZE
        self.soft_limit = max(0, self.entries - reserved)
        self.vcpu_id = vcpu_id
        self.owner = owner  # the VM's identity: a vCPU of another VM may not push here
        self._buf = bytearray(nbytes)
        self._reader = RingReader(self._buf) if self.entries else None
        self._kernel: list[Callable[[], list[tuple[int, int]]]] = []
        self.dirty_index = 0
        self.reset_index = 0
        self.request = False  # KVM_REQ_DIRTY_RING_SOFT_FULL
        self.overflows = 0  # pushes into a full ring (KVM's WARN_ON_ONCE)
        self.lock = sync.Mutex("dirty_ring")

    # -- state --------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & 0xFFFF_FFFF

    @property
    def soft_full(self) -> bool:
        return self.entries > 0 and self.used >= self.soft_limit

    def attach(self, harvest: Callable[[], list[tuple[int, int]]]) -> None:
        """An engine's own ring of this vCPU, harvested with kvmem's."""
        self._kernel.append(harvest)

    # -- KVM's side -----------------------------------------------------------------------------
    def push(self, slot: int, first: int, count: int = 1) -> None:
        """Entries (slot, first), ..., (slot, first + count - 1), in order."""
        with self.lock:
            buf, mask = self._buf, self.entries - 1
            for offset in range(first, first + count):
                if self.used >= self.entries:
                    self.overflows += 1  # written over an unreset entry, as KVM does
                at = (self.dirty_index & mask) * KVM_DIRTY_GFN_SIZE
                _GFN.pack_into(buf, at, 0, slot, offset)
                # slot and offset before the flag that publishes them
                _FLAGS.pack_into(buf, at, KVM_DIRTY_GFN_F_DIRTY)
                self.dirty_index = (self.dirty_index + 1) & 0xFFFF_FFFF
            if self.used >= self.soft_limit:
                self.request = True

    def check_request(self) -> bool:
        """Before the vCPU enters the guest (kvm_dirty_ring_check_request): True — exit
        with KVM_EXIT_DIRTY_RING_FULL, the request staying armed — while a raised request
        finds the ring still soft-full; a request that finds room is dropped."""
        with self.lock:
            if not self.request:
                return False
            if self.soft_full:
                return True
            self.request = False
            return False

    def reset(self) -> tuple[int, list[tuple[int, int, int]]]:
        """KVM's walk (kvm_dirty_ring_reset): (entries reset, [(slot, offset, mask)]) —
        bit b of mask stands for page offset + b of the slot. Consecutive entries of one
        slot join a batch while their offsets fit a 64-bit mask around its base (forward,
        or backward while the mask still fits)."""
        batches: list[tuple[int, int, int]] = []
        count = 0
        with self.lock:
            if not self.entries:
                return 0, batches
            buf, mask_i = self._buf, self.entries - 1
            cur_slot = cur_off = mask = 0
            first = True
            while True:
                at = (self.reset_index & mask_i) * KVM_DIRTY_GFN_SIZE
                flags, slot, offset = _GFN.unpack_from(buf, at)
                if not flags & KVM_DIRTY_GFN_F_RESET:
                    break
                _FLAGS.pack_into(buf, at, 0)
                self.reset_index = (self.reset_index + 1) & 0xFFFF_FFFF
                count += 1
                if not first and slot == cur_slot:
                    delta = offset - cur_off
                    if 0 <= delta < 64:
                        mask |= 1 << delta
                        continue
                    if -64 < delta < 0 and (mask << -delta) >> 64 == 0:
                        cur_off = offset
                        mask = (mask << -delta) | 1
                        continue
                if not first:
                    batches.append((cur_slot, cur_off, mask))
                cur_slot, cur_off, mask = slot, offset, 1
                first = False
            if not first:
                batches.append((cur_slot, cur_off, mask))
        return count, batches

    # -- userspace's side ---------------------------------------------------------------------
    def harvest(self) -> list[tuple[int, int]]:
        """Every entry dirtied since the last harvest, as (slot, offset) with slot =
        as_id << 16 | id and offset = gfn - base_gfn, in push order — kvmem's own, then
        an engine's — each flagged harvested so the next `reset_dirty_rings` frees it.
        EINVAL on a VM without dirty rings."""
        reader = self._reader
        if reader is None:
            raise KvmError(errno.EINVAL, f"vCPU {self.vcpu_id} has no dirty ring: enable it "
                                         "with vm.enable_dirty_ring(bytes) before creating "
                                         "vCPUs")
        with self.lock:
            out = reader.harvest()
        for kernel in self._kernel:
            out += kernel()
        return out

    def __repr__(self) -> str:
        return (f"DirtyRing(vcpu {self.vcpu_id}, {self.entries} entries, used {self.used}, "
                f"soft limit {self.soft_limit})")


# The vCPU loaded on this thread (KVM's kvm_get_running_vcpu), by its ring: the ring a mark
# made here goes to. Set while a vCPU runs guest code or does a vCPU's access.
_running = threading.local()


def running_ring() -> DirtyRing | None:
    ring: DirtyRing | None = getattr(_running, "ring", None)
    return ring


class loaded:
    """`with loaded(ring):` — the vCPU of `ring` is loaded on this thread for the block
    (vcpu_load ... vcpu_put); the one loaded before comes back after it."""

    __slots__ = ("_prev", "_ring")

    def __init__(self, ring: DirtyRing) -> None:
        self._ring = ring
        self._prev: DirtyRing | None = None

    def __enter__(self) -> DirtyRing:
        self._prev = getattr(_running, "ring", None)
        _running.ring = self._ring
        return self._ring

    def __exit__(self, *exc: object) -> None:
        _running.ring = self._prev
