"""Snapshots of a whole VM as values, and their file format.

Defines `Snapshot` — one consistent point of a VM: the slot layout of every address space,
the memory behind those slots, every vCPU's `VcpuState`, the user's dirty bitmaps and
dirty-log / write-tracking configuration — with `save` / `load` (full and diff files) and
`read` (guest memory of the snapshot by gpa). `SlotRecord` and `VcpuRecord` are its parts.
`Vm.snapshot`, `Vm.restore` and `Vm.from_snapshot` make and use snapshots; this file never
talks to a VM.

Rules of this room:
- A snapshot is a value: once made (captured or loaded) nothing in it changes. Its memory
  is kept as *images* of host memory — one per run of host addresses some slot maps,
  keyed by the hva it had when captured — because a VM's guest memory is the host memory
  behind its slots: two slots over one page (an SMRAM alias) share one image page.
- A file is refused before anything is built from it: magic, version, kind, the stated
  sizes against the file's size, the CRC-32 of everything, and a diff's parent (by id) are
  checked first, each with a message naming what is wrong (`SnapshotFormatError`).

File format, version 1 (all integers little-endian):
    header   64 bytes: magic b"KVMEMSNP", u32 version, u32 kind (0 full, 1 diff),
             16-byte id, 16-byte parent id (zeros in a full file), u64 meta length,
             u64 number of page runs
    meta     UTF-8 JSON: address_spaces, layout [[id, flags, gpa, size, hva]...] per
             address space, images [[hva, size]...], vcpus [{id, smm, state (base64 of
             VcpuState.to_bytes, or null)}], dirty [[as_id, id, base64 bitmap]...],
             manual_dirty_log_protect, tracked [[as_id, gfn, count]...], engine
    runs     16 bytes each: u32 image index, u32 page count, u64 first page in the image
    pages    the runs' pages, 4096 bytes each, in run order
    trailer  u32 CRC-32 of all bytes before it, magic b"KVMEMEND"
A full file holds every page that is not all zeros (a missing page reads as zeros); a diff
holds every page that differs from its parent's (images the parent lacks count as zeros).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import uuid
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .cpu import VcpuState
from .errors import KvmError
from .uapi import PAGE_SHIFT, PAGE_SIZE

__all__ = ["FORMAT_VERSION", "SlotRecord", "Snapshot", "SnapshotFormatError", "VcpuRecord"]

FORMAT_VERSION = 1
_MAGIC = b"KVMEMSNP"
_END = b"KVMEMEND"
_HEADER = struct.Struct("<8sII16s16sQQ")
_RUN = struct.Struct("<IIQ")
_TRAILER = struct.Struct("<I8s")
_FULL, _DIFF = 0, 1
_WRITE_CHUNK = 8 << 20  # one write() per run, cut at this many bytes


class SnapshotFormatError(ValueError):
    """A snapshot file that cannot be used: says which file and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """One slot of a snapshot's layout: KVM_SET_USER_MEMORY_REGION's fields."""

    as_id: int
    id: int
    flags: int
    gpa: int
    size: int
    hva: int

    @property
    def slot(self) -> int:
        return (self.as_id << 16) | self.id


@dataclass(frozen=True, slots=True)
class VcpuRecord:
    """One vCPU of a snapshot: its id, whether it was in SMM, and its whole state (None for
    a vCPU no engine runs: kvmem's own `Vcpu` has no registers)."""

    id: int
    smm: bool
    state: VcpuState | None


class _Image:
    """Host memory [hva, hva + size) as it was: `data` holds its bytes."""

    __slots__ = ("data", "hva", "size")

    def __init__(self, hva: int, data: bytearray) -> None:
        self.hva = hva
        self.size = len(data)
        self.data = data


class Snapshot:
    """A VM at one point (see the module notes). Make one with `vm.snapshot()`, or
    `Snapshot.load(path)`; bring a VM back with `vm.restore(snap)`, or make a new VM from
    it with `Vm.from_snapshot(snap, engine=...)`."""

    def __init__(self, *, address_spaces: int, layout: Sequence[SlotRecord],
                 images: Sequence[tuple[int, bytearray]], vcpus: Sequence[VcpuRecord],
                 dirty: dict[tuple[int, int], bytes], manual_dirty_log_protect: int,
                 tracked: Sequence[tuple[int, int, int]], engine: str | None,
                 snapshot_id: bytes | None = None, parent_id: bytes | None = None) -> None:
        self.address_spaces = address_spaces
        self.layout: tuple[SlotRecord, ...] = tuple(sorted(layout,
                                                           key=lambda r: (r.as_id, r.gpa)))
        self._images = sorted((_Image(h, d) for h, d in images), key=lambda i: i.hva)
        self._starts = [i.hva for i in self._images]
        self.vcpus: tuple[VcpuRecord, ...] = tuple(sorted(vcpus, key=lambda v: v.id))
        self.dirty = dict(dirty)
        """The user's dirty bitmaps (KVM's layout) by (as_id, slot id), for logging slots."""
        self.manual_dirty_log_protect = manual_dirty_log_protect
        self.tracked: tuple[tuple[int, int, int], ...] = tuple(sorted(tracked))
        """(as_id, gfn, count) of every write-tracked gfn."""
        self.engine = engine
        """The engine the VM ran on when the snapshot was taken (information only)."""
        self.id: bytes = snapshot_id if snapshot_id is not None else uuid.uuid4().bytes
        self.parent_id = parent_id
        """The id of the snapshot a diff file was loaded over (None for a full one)."""

    # -- contents ----------------------------------------------------------------------------
    def slots(self, as_id: int = 0) -> list[SlotRecord]:
        return [r for r in self.layout if r.as_id == as_id]

    @property
    def images(self) -> list[tuple[int, memoryview]]:
        """(hva at capture, read-only view of the bytes) of every memory image, in hva order."""
        return [(i.hva, memoryview(i.data).toreadonly()) for i in self._images]

    @property
    def memory_size(self) -> int:
        """Bytes of host memory the snapshot holds (aliased slots count once)."""
        return sum(i.size for i in self._images)

    def vcpu_state(self, vcpu_id: int) -> VcpuState | None:
        for v in self.vcpus:
            if v.id == vcpu_id:
                return v.state
        raise KeyError(f"the snapshot has no vCPU {vcpu_id}")

    def page(self, hva: int) -> memoryview | None:
        """The saved bytes of the host page at `hva` (as captured), or None if no slot
        mapped it."""
        i = bisect_right(self._starts, hva) - 1
        if i < 0:
            return None
        img = self._images[i]
        off = (hva - img.hva) & ~(PAGE_SIZE - 1)
        if off >= img.size:
            return None
        return memoryview(img.data)[off:off + PAGE_SIZE].toreadonly()

    def read(self, gpa: int, n: int, as_id: int = 0) -> bytes:
        """Guest memory [gpa, gpa + n) of `as_id` as it was (EFAULT where no slot was)."""
        out = bytearray()
        pos = gpa
        while pos < gpa + n:
            rec = next((r for r in self.layout if r.as_id == as_id
                        and r.gpa <= pos < r.gpa + r.size), None)
            if rec is None:
                raise KvmError(14, f"the snapshot has no slot at gpa {pos:#x}")
            take = min(gpa + n, rec.gpa + rec.size) - pos
            hva = rec.hva + (pos - rec.gpa)
            while take > 0:
                page = self.page(hva)
                assert page is not None
                off = hva & (PAGE_SIZE - 1)
                k = min(take, PAGE_SIZE - off)
                out += page[off:off + k]
                hva += k
                pos += k
                take -= k
        return bytes(out)

    def __repr__(self) -> str:
        return (f"Snapshot({self.id.hex()[:8]}, {len(self.layout)} slots, "
                f"{self.memory_size >> 10} KiB, {len(self.vcpus)} vCPUs)")

    # -- files -------------------------------------------------------------------------------
    def _meta(self) -> bytes:
        return json.dumps({
            "address_spaces": self.address_spaces,
            "layout": [[r.as_id, r.id, r.flags, r.gpa, r.size, r.hva] for r in self.layout],
            "images": [[i.hva, i.size] for i in self._images],
            "vcpus": [{"id": v.id, "smm": v.smm,
                       "state": None if v.state is None
                       else base64.b64encode(v.state.to_bytes()).decode()}
                      for v in self.vcpus],
            "dirty": [[a, s, base64.b64encode(b).decode()]
                      for (a, s), b in sorted(self.dirty.items())],
            "manual_dirty_log_protect": self.manual_dirty_log_protect,
            "tracked": [list(t) for t in self.tracked],
            "engine": self.engine,
        }, separators=(",", ":")).encode()

    def _runs(self, parent: Snapshot | None) -> list[tuple[int, int, int]]:
        """(image index, first page, page count) of the pages a file holds."""
        runs: list[tuple[int, int, int]] = []
        for k, img in enumerate(self._images):
            pages = np.frombuffer(img.data, dtype="<u8").reshape(-1, PAGE_SIZE // 8)
            base = parent._same_image(img.hva, img.size) if parent is not None else None
            if base is None:
                keep = _nonzero_pages(pages)
            else:
                old = np.frombuffer(base.data, dtype="<u8").reshape(-1, PAGE_SIZE // 8)
                keep = np.bitwise_or.reduce(pages ^ old, axis=1) != 0
            idx = np.flatnonzero(keep)
            if not len(idx):
                continue
            # runs of consecutive pages: where the index jumps
            cuts = np.flatnonzero(np.diff(idx) != 1) + 1
            for chunk in np.split(idx, cuts):
                runs.append((k, int(chunk[0]), len(chunk)))
        return runs

    def _same_image(self, hva: int, size: int) -> _Image | None:
        """This snapshot's image of exactly [hva, hva + size), if it has one."""
        i = bisect_right(self._starts, hva) - 1
        if i >= 0 and self._images[i].hva == hva and self._images[i].size == size:
            return self._images[i]
        return None

    def save(self, path: str | os.PathLike[str], parent: Snapshot | None = None) -> int:
        """Write the snapshot to `path`: a full file, or with `parent` a diff holding only
        the pages that differ from `parent`'s (and naming it). Returns the bytes written.
        The file is written in place (as fast as a raw write of the same bytes); a save cut
        short leaves a file `load` refuses (truncated, or failing its CRC)."""
        if parent is not None and not isinstance(parent, Snapshot):
            raise TypeError(f"parent must be a Snapshot, not {type(parent).__name__}")
        meta = self._meta()
        runs = self._runs(parent)
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, _DIFF if parent else _FULL, self.id,
                              parent.id if parent is not None else bytes(16), len(meta),
                              len(runs))
        index = b"".join(_RUN.pack(k, n, first) for k, first, n in runs)
        target = os.fspath(path)
        parts: list[bytes | memoryview] = [header, meta, index]
        for k, first, n in runs:
            view = memoryview(self._images[k].data)
            lo, hi = first << PAGE_SHIFT, (first + n) << PAGE_SHIFT
            parts += [view[at:min(hi, at + _WRITE_CHUNK)] for at in range(lo, hi, _WRITE_CHUNK)]

        def checksum() -> int:
            crc = 0
            for part in parts:
                crc = zlib.crc32(part, crc)
            return crc

        total = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        # the CRC runs in a thread beside the writes: both leave the GIL for the bytes
        with ThreadPoolExecutor(1, thread_name_prefix="kvmem-snapshot-crc") as pool:
            crc = pool.submit(checksum)
            try:
                for part in parts:
                    total += _write_all(fd, part)
                total += _write_all(fd, _TRAILER.pack(crc.result(), _END))
            finally:
                os.close(fd)
        return total

    @classmethod
    def load(cls, path: str | os.PathLike[str], parent: Snapshot | None = None) -> Snapshot:
        """Read a snapshot file; a diff needs its `parent` (the snapshot it names). Refuses
        (`SnapshotFormatError`) a truncated, corrupt, wrong-version or wrong-parent file
        before building anything."""
        name = os.fspath(path)
        with open(name, "rb") as f:
            raw = f.read()
        return cls._parse(name, memoryview(raw), parent)

    @classmethod
    def _parse(cls, name: str, raw: memoryview, parent: Snapshot | None) -> Snapshot:
        def bad(why: str) -> SnapshotFormatError:
            return SnapshotFormatError(f"{name}: {why}")

        if len(raw) < _HEADER.size + _TRAILER.size:
            raise bad(f"truncated: {len(raw)} bytes is too short for a kvmem snapshot")
        magic, version, kind, sid, pid, meta_len, nruns = _HEADER.unpack_from(raw, 0)
        if magic != _MAGIC:
            raise bad("not a kvmem snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise bad(f"format version {version}; this kvmem reads version {FORMAT_VERSION}")
        if kind not in (_FULL, _DIFF):
            raise bad(f"unknown kind {kind}")
        index_at = _HEADER.size + meta_len
        data_at = index_at + nruns * _RUN.size
        if data_at + _TRAILER.size > len(raw):
            raise bad(f"truncated: the header states {data_at + _TRAILER.size} bytes or more, "
                      f"the file has {len(raw)}")
        runs = [_RUN.unpack_from(raw, index_at + i * _RUN.size) for i in range(nruns)]
        npages = sum(n for _, n, _ in runs)
        expect = data_at + npages * PAGE_SIZE + _TRAILER.size
        if expect != len(raw):
            raise bad(f"{'truncated' if len(raw) < expect else 'trailing data'}: the index "
                      f"states {expect} bytes, the file has {len(raw)}")
        crc, end = _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
        if end != _END:
            raise bad("truncated or corrupt (bad end marker)")
        if zlib.crc32(raw[:len(raw) - _TRAILER.size]) != crc:
            raise bad("corrupt (CRC-32 mismatch)")
        if kind == _DIFF:
            if parent is None:
                raise bad(f"a diff snapshot: load it with its parent (id {pid.hex()})")
            if parent.id != pid:
                raise bad(f"a diff over snapshot {pid.hex()}, not over the parent given "
                          f"({parent.id.hex()})")
        elif parent is not None:
            raise bad("a full snapshot: it has no parent")
        try:
            meta = json.loads(bytes(raw[_HEADER.size:index_at]))
            layout = [SlotRecord(*map(int, r)) for r in meta["layout"]]
            spans = [(int(h), int(s)) for h, s in meta["images"]]
            vcpus = [VcpuRecord(int(v["id"]), bool(v["smm"]),
                                None if v["state"] is None
                                else VcpuState.from_bytes(base64.b64decode(v["state"])))
                     for v in meta["vcpus"]]
            dirty = {(int(a), int(s)): base64.b64decode(b) for a, s, b in meta["dirty"]}
            tracked = [(int(a), int(g), int(c)) for a, g, c in meta["tracked"]]
            manual = int(meta["manual_dirty_log_protect"])
            address_spaces = int(meta["address_spaces"])
            engine = meta["engine"]
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"corrupt metadata: {e}") from None
        for k, n, first in runs:
            if k >= len(spans) or (first + n) << PAGE_SHIFT > spans[k][1]:
                raise bad(f"a page run ({k}, {first}+{n}) lies outside the images")
        images: list[tuple[int, bytearray]] = []
        for hva, size in spans:
            base = parent._same_image(hva, size) if parent is not None else None
            if base is not None:
                images.append((hva, bytearray(base.data)))
            else:
                images.append((hva, bytearray(size)))
        pos = data_at
        for k, n, first in runs:
            length = n << PAGE_SHIFT
            images[k][1][first << PAGE_SHIFT:(first << PAGE_SHIFT) + length] = \
                raw[pos:pos + length]
            pos += length
        return cls(address_spaces=address_spaces, layout=layout, images=images, vcpus=vcpus,
                   dirty=dirty, manual_dirty_log_protect=manual, tracked=tracked,
                   engine=engine, snapshot_id=sid, parent_id=pid if kind == _DIFF else None)


def _nonzero_pages(pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Which rows (pages of 512 words) hold a non-zero word: the first word decides most
    pages of data at once; only pages that start with a zero word are read whole."""
    keep: npt.NDArray[np.bool_] = pages[:, 0] != 0
    rest = np.flatnonzero(~keep)
    if len(rest) * 8 < len(keep):
        keep[rest] = np.bitwise_or.reduce(pages[rest], axis=1) != 0
    else:
        keep = np.bitwise_or.reduce(pages, axis=1) != 0
    return keep


def _write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def image_spans(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Host ranges [start, end) merged where they overlap or touch: the images to capture."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
