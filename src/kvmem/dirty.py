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

__all__ = ["DirtyBitmap"]


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
