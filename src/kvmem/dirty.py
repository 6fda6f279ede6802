"""Dirty bitmaps (kvm-semantics §7.1, §7.2).

Defines `DirtyBitmap`: one per dirty-logging slot, `ALIGN(npages, 64) / 8` bytes in KVM's
layout (little-endian 64-bit words, bit i = page i of the slot), so `get` returns exactly
the bytes `KVM_GET_DIRTY_LOG` copies out. A 4 GiB slot costs 128 KiB, not a set of ints.
Word-wide operations (harvest, clear by mask) run in NumPy; marking one page is a single
byte operation under the bitmap's lock (KVM's atomic `set_bit`).

The bitmap object belongs to the slot and survives MOVE and LOG_DIRTY on→on FLAGS_ONLY
changes (the new slot takes the same object), as KVM hands `old->dirty_bitmap` over.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import sync

__all__ = ["DirtyBitmap", "RestoreLog"]


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
