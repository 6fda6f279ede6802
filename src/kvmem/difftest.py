"""The differential engine test: one random program, run again and again on KVM and on Unicorn
with the same host actions in between, must leave the same trace on both.

Defines `Plan` (a program, the VM's layout and the schedule of steps, all decided by one
seed), `plan(seed, mode)`, `schedule(rng, slots)` (the steps alone, for a layout),
`Runner(plan, engine)` (one VM under a plan: its host actions and runs, also used by the
snapshot property test), `trace(plan, engine)` (what one engine does under the plan: a list
of events) and `compare(seed, mode)` → `Divergence | None`; `main()` runs many seeds and
prints the divergences by kind (`python -m kvmem.difftest --programs 200`).

What is compared, event by event, in order: every exit (its fields) with the 32-bit registers
at it (all of EFLAGS) and the whole data window's memory at it; every tracked write a
page-track notifier hears; every host action and its outcome (errno); every bitmap a harvest
returns; after each run, the whole vCPU state's general registers (all of RFLAGS) and all
guest memory (every host page behind the window and the low slot).

The VM: a low slot [0, 1 MiB) with the code (at `CODE`) and the mode's tables; a data window
of `WINDOW_PAGES` pages at `DATA`, cut into RAM, logging RAM, read-only slots and holes; an
MMIO window at `MMIO` (never a slot); a far range at `FAR` where slots may move. In long64,
half the plans (by their own draw from the seed) start with page tables whose entries have
no accessed or dirty bits: the CPU's walks set them, as guest writes the dirty logs see.
Steps are runs (the program from its entry with EBP = the pass number, host actions at some
of its exits) and host actions: harvests (GET, GET + CLEAR under manual protect),
`vm.write`, transactions (split, merge, move), `discard` of host pages, tracking on/off,
logging on/off. MMIO reads and INs are answered with bytes derived from their address, so
both engines get the same answers for the same accesses.

Rules: the schedule is decided by the seed and a model of the layout only, never by what an
engine did, so both engines get the same steps for as long as their traces agree; the first
event that differs is the divergence. Host actions run after an exit is answered, never
between a read exit and its answer.

EFLAGS: RF (bit 16) is KVM's on both engines (set at exits inside an unfinished REP string
instruction: see `kvmem.engines.unicorn`). AF is architecturally undefined after XOR (the
checksum fold, the stored values) and defined after CMP (the self-checks); it is compared
all the same, as both engines give 0 after XOR here (KVM's emulator runs the host CPU's XOR;
QEMU defines it as 0) — a host whose CPU sets it otherwise would show "registers at an exit"
differing in bit 4 only, not an engine bug.

Cases once found and now compared (tests/test_engine_accesses.py, test_engine_exits.py pin
each on both engines): a load crossing from a RAM page into a page without memory whose RAM
part the host changes between the MMIO exit and its answer (seed 10527: a discard at that
exit) completes with the RAM bytes read before the exit, as KVM's emulator does; a store
crossing the other way has written its RAM part by its exit; at a string IN's exit the
element's bytes are untouched (QEMU's INS stored a zero there first); nothing after a port
instruction in a run's first block has run at its exit (with paging on).

A store crossing from a RAM page into a page without memory, whose source overlaps that
RAM part (seeds 11678 in prot32 and 320 in long64: a `movs` element with dst = src + 3):
KVM's emulator reads the whole source, then writes, so the MMIO write exit carries the
source as it was. Unicorn stored a page-crossing store byte by byte, the RAM bytes first, so
the exact rerun read back what the first attempt wrote. Now the fill of the page a store
crosses into comes before any byte is stored, and kvmem's TLB fill refuses it for a slow
page (`UnicornVcpu._store_gate`): nothing is stored, and the instruction runs exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import vm as _vm
from .cpu import modes
from .engines import Exit, ExitKind  # also registers the engines
from .errors import KvmError
from .guests import randprog
from .host import HostMemory
from .slots import MemorySlot
from .uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE
from .vm import Vcpu

__all__ = ["Divergence", "Plan", "Runner", "Slot", "compare", "main", "plan", "schedule",
           "trace"]

LOW_SIZE = 1 << 20
CODE = 0x10000
GDT = 0x1000  # prot32
TABLES = 0x20000  # long64: page tables, then the GDT
DATA = 0x100000
WINDOW_PAGES = 16
MMIO = 0x200000
MMIO_PAGES = 2
FAR = 0x300000
FAR_PAGES = 32
MAX_EXITS = 400
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
Action = tuple[Any, ...]  # (kind, arguments...)


@dataclass
class Slot:
    """A slot of the data window as a plan describes it."""

    gpa: int
    npages: int
    off: int  # page offset into the window's host memory
    flags: int


@dataclass
class Plan:
    seed: int
    mode: str
    manual: bool
    low_flags: int
    slots: dict[int, Slot]  # the window's slots at the start, by id
    fill: bytes  # the window's initial contents
    program: randprog.RandomProgram
    steps: list[tuple[str, Any]] = field(default_factory=list)
    # long64: page tables without accessed/dirty bits, which the CPU's walks then set (and
    # dirty logging sees) — drawn from its own generator, so the rest of a plan is the same
    bare_tables: bool = False
    # ("run", (pass, {exit index: [actions]})) or ("act", action)


class _Model:
    """The layout as the schedule believes it is (the engines are never asked)."""

    def __init__(self, rng: random.Random, slots: dict[int, Slot]) -> None:
        self.rng = rng
        self.slots = {i: dataclasses.replace(s) for i, s in slots.items()}
        self.tracked: list[int] = []

    def _free_id(self) -> int:
        return next(i for i in range(1, 64) if i not in self.slots)

    def _free_range(self, npages: int) -> int | None:
        spots = []
        for base, total in ((DATA, WINDOW_PAGES), (FAR, FAR_PAGES)):
            for p in range(total - npages + 1):
                lo, hi = base + p * PAGE_SIZE, base + (p + npages) * PAGE_SIZE
                if all(s.gpa + s.npages * PAGE_SIZE <= lo or s.gpa >= hi
                       for s in self.slots.values()):
                    spots.append(lo)
        return self.rng.choice(spots) if spots else None

    def action(self) -> Action:
        rng = self.rng
        kinds = ["harvest", "harvest", "write", "split", "merge", "move", "discard", "track",
                 "untrack", "log"]
        while True:
            kind = rng.choice(kinds)
            act = self._make(kind)
            if act is not None:
                return act

    def _make(self, kind: str) -> Action | None:
        rng = self.rng
        ids = sorted(self.slots)
        if kind == "harvest":
            return ("harvest", rng.getrandbits(16))
        if kind == "write":
            n = rng.randint(1, 16)
            gpa = DATA + rng.randrange(WINDOW_PAGES * PAGE_SIZE - n)
            if rng.random() < 0.3:
                gpa = DATA + rng.randrange(1, WINDOW_PAGES) * PAGE_SIZE - rng.randint(1, n)
            return ("write", gpa, rng.randbytes(n))
        if kind == "split":
            big = [i for i in ids if self.slots[i].npages >= 2]
            if not big:
                return None
            sid = rng.choice(big)
            s = self.slots[sid]
            k = rng.randrange(1, s.npages)
            nid = self._free_id()
            self.slots[nid] = Slot(s.gpa + k * PAGE_SIZE, s.npages - k, s.off + k, s.flags)
            s.npages = k
            return ("split", sid, s.gpa + k * PAGE_SIZE, nid)
        if kind == "merge":
            pairs = [(a, b) for a in ids for b in ids
                     if self.slots[a].gpa + self.slots[a].npages * PAGE_SIZE
                     == self.slots[b].gpa
                     and self.slots[a].off + self.slots[a].npages == self.slots[b].off
                     and self.slots[a].flags == self.slots[b].flags]
            if not pairs:
                return None
            a, b = rng.choice(pairs)
            self.slots[a].npages += self.slots.pop(b).npages
            return ("merge", a, b)
        if kind == "move":
            if not ids:
                return None
            sid = rng.choice(ids)
            s = self.slots[sid]
            old = s.gpa
            del self.slots[sid]
            to = self._free_range(s.npages)
            self.slots[sid] = s
            if to is None or to == old:
                return None
            s.gpa = to
            return ("move", sid, to)
        if kind == "discard":
            n = rng.randint(1, 3)
            return ("discard", rng.randrange(WINDOW_PAGES - n + 1), n)
        if kind == "track":
            writable = [i for i in ids if not self.slots[i].flags & RO]
            if not writable:
                return None
            s = self.slots[rng.choice(writable)]
            gfn = s.gpa // PAGE_SIZE + rng.randrange(s.npages)
            self.tracked.append(gfn)
            return ("track", gfn)
        if kind == "untrack":
            if not self.tracked:
                return None
            return ("untrack", self.tracked.pop(rng.randrange(len(self.tracked))))
        if kind == "log":
            writable = [i for i in ids if not self.slots[i].flags & RO]
            if not writable:
                return None
            sid = rng.choice(writable)
            self.slots[sid].flags ^= LOG
            return ("log", sid, self.slots[sid].flags)
        raise AssertionError(kind)


def plan(seed: int, mode: str | None = None, *, runs: int | None = None) -> Plan:
    """Everything one comparison does, decided by `seed` (and `mode`, default by the seed)."""
    rng = random.Random(seed)
    mode = mode if mode is not None else rng.choice(randprog.MODES)
    manual = rng.random() < 0.5
    low_flags = LOG if rng.random() < 0.3 else 0
    slots: dict[int, Slot] = {}
    page = 0
    sid = 1
    while page < WINDOW_PAGES:
        n = min(rng.choice((1, 1, 2, 3, 4, 6)), WINDOW_PAGES - page)
        kind = rng.choices(("ram", "log", "ro", "hole"), (3, 3, 2, 2))[0]
        if kind != "hole":
            flags = {"ram": 0, "log": LOG, "ro": RO}[kind]
            slots[sid] = Slot(DATA + page * PAGE_SIZE, n, page, flags)
            sid += 1
        page += n
    fill = rng.randbytes(WINDOW_PAGES * PAGE_SIZE)
    program = randprog.generate(rng.getrandbits(32), mode, (DATA, WINDOW_PAGES),
                                (MMIO, MMIO_PAGES))
    p = Plan(seed, mode, manual, low_flags, slots, fill, program,
             bare_tables=mode == "long64" and random.Random(seed ^ 0xAD).random() < 0.5)
    p.steps = schedule(rng, slots, runs)
    return p


def schedule(rng: random.Random, slots: dict[int, Slot], runs: int | None = None
             ) -> list[tuple[str, Any]]:
    """The steps of a plan whose window starts as `slots`: `runs` runs (default 2-4, by
    `rng`) with host actions at some of their exits, 1-3 host actions after each, and a
    last harvest of everything; only `rng` and the model of the layout decide."""
    steps: list[tuple[str, Any]] = []
    model = _Model(rng, slots)
    nruns = runs if runs is not None else rng.randint(2, 4)
    for r in range(nruns):
        mid: dict[int, list[Action]] = {}
        for _ in range(rng.randint(0, 3)):
            mid.setdefault(rng.randrange(12), []).append(model.action())
        steps.append(("run", (r + 1, mid)))
        for _ in range(rng.randint(1, 3)):
            steps.append(("act", model.action()))
    steps.append(("act", ("harvest", 0xFFFF)))
    return steps


class _Recorder:
    """A page-track notifier that writes what it hears into the trace."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def track_write(self, gpa: int, data: bytes) -> None:
        self.events.append(f"tracked write {gpa:#x} {data.hex()}")

    def track_remove_region(self, gfn: int, npages: int) -> None:
        self.events.append(f"track remove {gfn:#x}+{npages}")


def _answer(e: Exit, pass_no: int) -> bytes:
    n = e.answer_size
    base = e.addr * 7 + pass_no * 13 + (0x5A if e.kind is ExitKind.IO else 0xA5)
    return bytes((base + 31 * i) & 0xFF for i in range(n))


def _regs(cpu: Vcpu) -> str:
    r = cpu.get_regs()
    return (f"eax={r.eax:x} ebx={r.ebx:x} ecx={r.ecx:x} edx={r.edx:x} esi={r.esi:x} "
            f"edi={r.edi:x} eip={r.eip:x} fl={r.eflags:x}")


class Runner:
    """One engine under a plan: its VM laid out as the plan says (window filled, program
    and the mode's tables loaded, vCPU 0 made), `act(action)` for a host action, `run(pass,
    mid)` for a run with actions at its exits, `events` for what happened. With `engine`
    None the VM is kvmem alone: host actions work, runs do not. `logging` is the set of
    slots the harvests read (the ones that log dirty pages, as the actions left them).

    With `ring` (bytes per vCPU) the VM logs to dirty rings instead of bitmaps: a harvest
    action harvests vCPU 0's ring and resets the rings (`ring_harvest`), and so does a run
    at a DIRTY_RING_FULL exit, as a VMM would; `ring_seen` collects the host pages (hvas)
    of every entry harvested. (The differential plans log to bitmaps: this host's KVM logs
    an entry per emulated write, Unicorn one per page, so entries are compared as pages.)"""

    def __init__(self, p: Plan, engine: str | None, ring: int = 0) -> None:
        self.p = p
        self.events: list[str] = []
        self.ring_seen: set[int] = set()
        self.low = HostMemory.anonymous(LOW_SIZE)
        self.window = HostMemory.anonymous(WINDOW_PAGES * PAGE_SIZE)
        self.window.view()[:] = p.fill
        self.vm = _vm.Vm(engine=engine, address_spaces=1)
        vm = self.vm
        if ring:
            vm.enable_dirty_ring(ring)
        if p.manual:
            vm.enable_manual_dirty_log_protect()
        vm.set_memory_region(0, p.low_flags, 0, LOW_SIZE, self.low.hva)
        for sid, s in sorted(p.slots.items()):
            vm.set_memory_region(sid, s.flags, s.gpa, s.npages * PAGE_SIZE,
                                 self.window.hva + s.off * PAGE_SIZE)
        self.logging = {0} if p.low_flags & LOG else set()
        self.logging |= {sid for sid, s in p.slots.items() if s.flags & LOG}
        vm.write(CODE, p.program.code)
        if p.mode == "long64":
            self.state = modes.long_mode(CODE, vm.write, TABLES)
            if p.bare_tables:  # every present entry without its accessed and dirty bits
                n = modes.identity_map_bytes(1 << 30)
                raw = bytearray(vm.read(TABLES, n))
                for at in range(0, n, 8):
                    e = int.from_bytes(raw[at:at + 8], "little")
                    if e & 1:
                        raw[at:at + 8] = (e & ~0x60).to_bytes(8, "little")
                vm.write(TABLES, bytes(raw))
        else:
            self.state = modes.protected_mode(CODE, vm.write, GDT)
        vm.page_track.register(_Recorder(self.events))
        self.cpu: Vcpu = vm.create_vcpu(0)

    def close(self) -> None:
        if self.vm.engine is not None:
            self.vm.engine.close()
        self.low.close()
        self.window.close()

    # -- host actions ---------------------------------------------------------------------------
    def act(self, a: Action) -> None:
        try:
            what = self._act(a)
        except KvmError as e:
            what = f"errno {errno.errorcode.get(e.errno or 0, e.errno)}"
        self.events.append(f"action {a[0]} {' '.join(map(_show, a[1:]))}: {what}")

    def _act(self, a: Action) -> str:
        vm = self.vm
        kind = a[0]
        if kind == "harvest":
            (mask,) = a[1:]
            assert isinstance(mask, int)
            if vm.dirty_ring_size:
                return "ring " + " ".join(f"{h:x}" for h in sorted(self.ring_harvest()))
            out = []
            for sid in sorted(self.logging):
                bitmap = vm.get_dirty_log(sid)
                out.append(f"{sid}:{bitmap.hex()}")
                if self.p.manual:  # clear some of what was harvested, by the mask
                    keep = bytes(b & (mask >> (8 * (i % 2))) & 0xFF
                                 for i, b in enumerate(bitmap))
                    vm.clear_dirty_log(sid, 0, self._npages(sid), keep)
            return " ".join(out)
        if kind == "write":
            gpa, data = a[1:]
            assert isinstance(gpa, int) and isinstance(data, bytes)
            vm.write(gpa, data)
            return "ok"
        if kind in ("split", "merge", "move"):
            with vm.transaction() as tx:
                if kind == "split":
                    sid, at, nid = a[1:]
                    assert isinstance(sid, int) and isinstance(at, int) and isinstance(nid, int)
                    tx.split(sid, [at], ids=[nid])
                    if sid in self.logging:
                        self.logging.add(nid)
                elif kind == "merge":
                    x, y = a[1:]
                    assert isinstance(x, int) and isinstance(y, int)
                    tx.merge([x, y])
                    self.logging.discard(y)
                else:
                    sid, to = a[1:]
                    assert isinstance(sid, int) and isinstance(to, int)
                    s = self._slot(sid)
                    tx.set_memory_region(sid, s.flags, to, s.size, s.hva)
            return "ok"
        if kind == "discard":
            page, n = a[1:]
            assert isinstance(page, int) and isinstance(n, int)
            self.window.discard(page * PAGE_SIZE, n * PAGE_SIZE)
            return "ok"
        if kind == "track":
            vm.page_track.add_gfn(a[1])
            return "ok"
        if kind == "untrack":
            vm.page_track.remove_gfn(a[1])
            return "ok"
        if kind == "log":
            sid, flags = a[1:]
            assert isinstance(sid, int) and isinstance(flags, int)
            s = self._slot(sid)
            vm.set_memory_region(sid, flags, s.gpa, s.size, s.hva)
            if flags & LOG:
                self.logging.add(sid)
            else:
                self.logging.discard(sid)
            return "ok"
        raise AssertionError(kind)

    def ring_harvest(self) -> set[int]:
        """Harvest vCPU 0's dirty ring and reset the VM's rings: the host pages (hvas) of
        the entries, also added to `ring_seen`. An entry of a slot gone since is skipped."""
        vm = self.vm
        got: set[int] = set()
        for slot, offset in self.cpu.dirty_ring.harvest():
            s = vm.slot_set(slot >> 16).by_id(slot & 0xFFFF)
            if s is not None and offset < s.npages:
                got.add(s.hva_of(s.base_gfn + offset))
        vm.reset_dirty_rings()
        self.ring_seen |= got
        return got

    def _slot(self, sid: int) -> MemorySlot:
        for s in self.vm.slots():
            if s.id == sid:
                return s
        raise KvmError(errno.ENOENT, f"no slot {sid}")

    def _npages(self, sid: int) -> int:
        return self._slot(sid).npages

    # -- runs -----------------------------------------------------------------------------------
    def run(self, pass_no: int, mid: dict[int, list[Action]]) -> None:
        cpu = self.cpu
        cpu.set_state(self.state.with_regs(rbp=pass_no))
        for i in range(MAX_EXITS):
            e = cpu.run()
            self.events.append(f"exit {e} | {_regs(cpu)}")
            self.events.append(f"window at the exit {self._window_digest()}")
            if e.reads:
                cpu.complete(_answer(e, pass_no))
            for a in mid.get(i, []):
                self.act(a)
            if e.kind is ExitKind.DIRTY_RING_FULL:
                self.ring_harvest()  # room for the guest, as a VMM makes it
                continue
            if e.kind not in (ExitKind.IO, ExitKind.MMIO):
                break
        else:
            self.events.append("too many exits")
        try:
            r = cpu.get_state().regs
        except KvmError as e:
            self.events.append(f"get_state: {e}")
            return
        self.events.append(" ".join(f"{k}={v:x}" for k, v in dataclasses.asdict(r).items()))
        self.events.append(f"memory {self._digest()}")

    def _window_digest(self) -> str:
        return hashlib.sha1(self.window.view()).hexdigest()[:16]

    def _digest(self) -> str:
        h = hashlib.sha1(bytes(self.low.view()))
        h.update(bytes(self.window.view()))
        return h.hexdigest()[:16]

    def memory(self) -> bytes:
        return bytes(self.low.view()) + bytes(self.window.view())


def _show(x: object) -> str:
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, int):
        return hex(x)
    return str(x)


def trace(p: Plan, engine: str) -> tuple[list[str], bytes]:
    """The events of `engine` under `p`, and its memory at the end (low slot + window)."""
    run = Runner(p, engine)
    try:
        for kind, arg in p.steps:
            if kind == "run":
                pass_no, mid = arg
                run.run(pass_no, mid)
            else:
                run.act(arg)
        return run.events, run.memory()
    finally:
        run.close()


@dataclass
class Divergence:
    seed: int
    mode: str
    index: int  # of the first event that differs
    kvm: str
    unicorn: str
    context: list[str]  # the events before it (both agree on them)
    memory_at: int | None  # the first differing byte (low slot offset, then the window's)

    @property
    def kind(self) -> str:
        """A short name for grouping: what sort of event differs, and how."""
        a, b = self.kvm, self.unicorn
        head = a.split(" ", 1)[0] if a else "end"
        if head == "exit" and b.startswith("exit"):
            ea, eb = a.split(" | ")[0], b.split(" | ")[0]
            if ea == eb:
                return "registers at an exit"
            return f"exit: {_exit_kind(ea)} vs {_exit_kind(eb)}"
        if head == "tracked" or b.startswith("tracked"):
            return "tracked writes"
        if head == "memory":
            return "memory after a run"
        if head == "window":
            return "memory at an exit"
        if head == "action":
            return f"host action {a.split()[1]}"
        if head.startswith("r") and "rip=" in a:
            return "registers after a run"
        return f"{head} vs {b.split(' ', 1)[0] if b else 'end'}"

    def report(self) -> str:
        lines = [f"seed {self.seed} ({self.mode}): event {self.index} differs",
                 f"  kvm:     {self.kvm}", f"  unicorn: {self.unicorn}"]
        if self.memory_at is not None:
            lines.append(f"  first differing memory byte: {_where(self.memory_at)}")
        lines += ["  before it:"] + [f"    {e}" for e in self.context]
        return "\n".join(lines)


def _exit_kind(e: str) -> str:
    parts = e.split()
    if len(parts) < 2:
        return e
    if parts[1] in ("io", "mmio"):
        return f"{parts[1]} {'write' if 'write' in e or 'out' in e else 'read'}"
    return parts[1]


def _where(offset: int) -> str:
    if offset < LOW_SIZE:
        return f"low gpa {offset:#x}"
    return f"window page {(offset - LOW_SIZE) // PAGE_SIZE} + {(offset - LOW_SIZE) % PAGE_SIZE:#x}"


def compare(seed: int, mode: str | None = None, *, engines: tuple[str, str] = ("kvm", "unicorn"),
            runs: int | None = None) -> Divergence | None:
    """Run the plan of `seed` on both engines; the first difference, or None."""
    p = plan(seed, mode, runs=runs)
    ta, ma = trace(p, engines[0])
    tb, mb = trace(p, engines[1])
    n = min(len(ta), len(tb))
    i = next((k for k in range(n) if ta[k] != tb[k]), n)
    if i == len(ta) == len(tb) and ma == mb:
        return None
    at = next((k for k in range(min(len(ma), len(mb))) if ma[k] != mb[k]), None)
    return Divergence(seed, p.mode, i, ta[i] if i < len(ta) else "",
                      tb[i] if i < len(tb) else "", (ta[:i])[-6:], at)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=100)
    ap.add_argument("--first", type=int, default=0, help="first seed")
    ap.add_argument("--mode", choices=randprog.MODES)
    ap.add_argument("--show", type=int, default=1, help="reports printed per kind")
    ap.add_argument("--verbose", action="store_true", help="one line per program")
    args = ap.parse_args(argv)
    kinds: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    steps = 0
    t0 = time.perf_counter()
    for seed in range(args.first, args.first + args.programs):
        steps += len(plan(seed, args.mode).steps)
        d = compare(seed, args.mode)
        if args.verbose:
            print(f"seed {seed}: {'same' if d is None else d.kind}", flush=True)
        if d is None:
            continue
        kinds[d.kind] += 1
        if shown[d.kind] < args.show:
            shown[d.kind] += 1
            print(d.report(), end="\n\n")
    took = time.perf_counter() - t0
    print(f"{args.programs} programs, {steps} steps, {took:.1f} s; "
          f"{sum(kinds.values())} diverged")
    for kind, n in kinds.most_common():
        print(f"  {n:5}  {kind}")
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())

