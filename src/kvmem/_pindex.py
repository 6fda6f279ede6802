"""Persistent sorted indexes for slot sets: O(log n) lookups, O(√n) updates, readers never lock.

Defines:
- `SortedIndex` — an immutable map from int keys to values, kept as a tuple of sorted
  chunks (≤ 2·CHUNK entries each) plus a tuple of each chunk's first key. A lookup is two
  C-level `bisect`s; an insert or remove copies one chunk and the tuple of first keys, never
  the whole index — so a change at 32,764 slots costs about what it costs at 100. Each chunk
  may also keep the largest `end` of its values (given `end_of`: interval queries over
  hva ranges, whose intervals may overlap because hvas may alias), maintained
  incrementally.
- `IdTable` — an immutable array of 32,768 entries in 128 pages of 256: get is two index
  operations, set copies one page and the page table.

Both return new objects from every change; the old one stays valid for its readers.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

CHUNK = 256


class SortedIndex(Generic[V]):
    __slots__ = ("_end_of", "chunk_ends", "chunk_keys", "chunk_vals", "size", "tops")

    def __init__(
        self,
        end_of: Callable[[V], int] | None = None,
        tops: tuple[int, ...] = (),
        chunk_keys: tuple[tuple[int, ...], ...] = (),
        chunk_vals: tuple[tuple[V, ...], ...] = (),
        chunk_ends: tuple[int, ...] = (),
        size: int = 0,
    ) -> None:
        self._end_of = end_of
        self.tops = tops
        self.chunk_keys = chunk_keys
        self.chunk_vals = chunk_vals
        self.chunk_ends = chunk_ends
        self.size = size

    def __len__(self) -> int:
        return self.size

    def floor(self, key: int) -> V | None:
        """The value with the largest key ≤ `key`."""
        c = bisect_right(self.tops, key) - 1
        if c < 0:
            return None
        keys = self.chunk_keys[c]
        return self.chunk_vals[c][bisect_right(keys, key) - 1]

    def get(self, key: int) -> V | None:
        c = bisect_right(self.tops, key) - 1
        if c < 0:
            return None
        keys = self.chunk_keys[c]
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return self.chunk_vals[c][i]
        return None

    def _rebuild(self, c: int, keys: list[int], vals: list[V], end: int | None
                 ) -> SortedIndex[V]:
        """Replace chunk `c` by `keys/vals` whose largest end is `end` (None: recompute);
        split if too big, dropped if empty."""
        new_keys: list[tuple[int, ...]] = []
        new_vals: list[tuple[V, ...]] = []
        if len(keys) > 2 * CHUNK:
            for i in range(0, len(keys), CHUNK):
                new_keys.append(tuple(keys[i:i + CHUNK]))
                new_vals.append(tuple(vals[i:i + CHUNK]))
            end = None
        elif keys:
            new_keys.append(tuple(keys))
            new_vals.append(tuple(vals))
        end_of = self._end_of
        if end_of is None:
            ends: tuple[int, ...] = ()
        elif end is not None:
            ends = (end,)
        else:
            ends = tuple(max(map(end_of, vs)) for vs in new_vals)
        tops = tuple(k[0] for k in new_keys)
        return SortedIndex(
            end_of,
            self.tops[:c] + tops + self.tops[c + 1:],
            self.chunk_keys[:c] + tuple(new_keys) + self.chunk_keys[c + 1:],
            self.chunk_vals[:c] + tuple(new_vals) + self.chunk_vals[c + 1:],
            self.chunk_ends[:c] + ends + self.chunk_ends[c + 1:] if end_of else (),
            self.size + len(keys) - (len(self.chunk_keys[c]) if c < len(self.chunk_keys) else 0),
        )

    def _end_after_insert(self, c: int, value: V) -> int | None:
        if self._end_of is None:
            return None
        return max(self.chunk_ends[c], self._end_of(value))

    def _end_after_remove(self, c: int, value: V) -> int | None:
        """The chunk's end stays unless the removed value held it (then: recompute)."""
        if self._end_of is None or self._end_of(value) >= self.chunk_ends[c]:
            return None
        return self.chunk_ends[c]

    def insert(self, key: int, value: V) -> SortedIndex[V]:
        if not self.tops:
            ends = () if self._end_of is None else (self._end_of(value),)
            return SortedIndex(self._end_of, (key,), ((key,),), ((value,),), ends, 1)
        c = max(bisect_right(self.tops, key) - 1, 0)
        keys = list(self.chunk_keys[c])
        vals = list(self.chunk_vals[c])
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise KeyError(f"duplicate key {key:#x}")
        keys.insert(i, key)
        vals.insert(i, value)
        return self._rebuild(c, keys, vals, self._end_after_insert(c, value))

    def remove(self, key: int) -> SortedIndex[V]:
        c = bisect_right(self.tops, key) - 1
        if c < 0:
            raise KeyError(key)
        keys = list(self.chunk_keys[c])
        i = bisect_left(keys, key)
        if i == len(keys) or keys[i] != key:
            raise KeyError(key)
        vals = list(self.chunk_vals[c])
        end = self._end_after_remove(c, vals[i])
        del keys[i], vals[i]
        return self._rebuild(c, keys, vals, end)

    def replace(self, old_key: int, key: int, value: V) -> SortedIndex[V]:
        """Remove `old_key` and insert `key`; in place within the chunk when the key stays."""
        if old_key == key:
            c = bisect_right(self.tops, key) - 1
            keys = self.chunk_keys[c]
            i = bisect_left(keys, key)
            if i == len(keys) or keys[i] != key:
                raise KeyError(key)
            vals = list(self.chunk_vals[c])
            end = self._end_after_remove(c, vals[i])
            vals[i] = value
            if end is not None and self._end_of is not None:
                end = max(end, self._end_of(value))
            return self._rebuild(c, list(keys), vals, end)
        return self.remove(old_key).insert(key, value)

    def from_key(self, key: int) -> Iterator[V]:
        """Values in key order, starting with the floor of `key` (if any)."""
        c = bisect_right(self.tops, key) - 1
        if c < 0:
            c, i = 0, 0
        else:
            i = max(bisect_right(self.chunk_keys[c], key) - 1, 0)
        for cc in range(c, len(self.chunk_vals)):
            vals = self.chunk_vals[cc]
            yield from vals[i:]
            i = 0

    def overlapping(self, start: int, end: int) -> Iterator[V]:
        """Values whose interval [key, end_of(value)) meets [start, end)."""
        end_of = self._end_of
        if end_of is None:
            raise TypeError("this index keeps no interval ends")
        last = bisect_left(self.tops, end)  # chunks that begin before `end`
        for c in range(last):
            if self.chunk_ends[c] <= start:
                continue
            keys = self.chunk_keys[c]
            vals = self.chunk_vals[c]
            for i in range(bisect_left(keys, end)):
                if end_of(vals[i]) > start:
                    yield vals[i]

    def __iter__(self) -> Iterator[V]:
        for vals in self.chunk_vals:
            yield from vals


class IdTable(Generic[V]):
    __slots__ = ("pages",)

    PAGE_BITS = 8
    NPAGES = 128

    def __init__(self, pages: tuple[tuple[V | None, ...] | None, ...] | None = None) -> None:
        self.pages = pages if pages is not None else (None,) * self.NPAGES

    def get(self, i: int) -> V | None:
        page = self.pages[i >> 8]
        return None if page is None else page[i & 255]

    def set(self, i: int, value: V | None) -> IdTable[V]:
        p = i >> 8
        page = list(self.pages[p] or (None,) * 256)
        page[i & 255] = value
        pages = list(self.pages)
        pages[p] = None if all(x is None for x in page) else tuple(page)
        return IdTable(tuple(pages))

    def free(self) -> Iterator[int]:
        """Indexes holding None, in order (a whole empty page costs one step)."""
        for p, page in enumerate(self.pages):
            if page is None:
                yield from range(p << 8, (p + 1) << 8)
            else:
                for j, v in enumerate(page):
                    if v is None:
                        yield (p << 8) | j
