"""Guest programs bundled with kvmem, and the CPU mode they run in.

CPU mode of `walker`, `poker`, `loop`: 32-bit protected mode, flat 4 GiB code and data
segments, CPL 0, no paging, no IDT, interrupts off — what `Vcpu.start(entry, regs)`
sets up on every engine. It is the smallest mode in which one binary behaves identically on
KVM and on Unicorn with no page tables to build. On this project's hosts KVM emulates ring-0
code (~0.5 M instructions/s), so the programs touch one word per page where they walk
memory; Unicorn runs them natively fast. Inputs are registers; results are port writes and
memory.

Programs:
- `walker` — writes `addr ^ seed ^ pass` at every stride of a range and folds it back into a
  checksum; exits: `out 0x10` checksum, hlt.
- `poker` — MMIO and port reads and writes of widths 1, 2 and 4, storing what it read into
  RAM; exits: 5 MMIO and 4 port accesses (see poker.S), hlt.
- `loop` — writes a counter to a page and reads it back, n times or until kicked; exits:
  `out 0x11` with the value read on a torn access, `out 0x10` counter, hlt.

Programs for the CPU modes of `kvmem.cpu.modes` (each states its mode, inputs and exits in its
source; tests/test_cpu_modes.py runs them on both engines and moves them between engines
mid-way):
- `real16` — real mode: a fill through DS and a segment register loaded from BP, a checksum
  read back through ES, call/ret, and INT 0x40 through the IVT it installs; exits: `out 0x10`
  last word, `out 0x10` ~checksum (from the handler), `out 0x10` checksum, hlt.
- `prot32` — 32-bit protected mode: CS, DS, ES, SS reloaded from `kvmem.cpu.modes.GDT`, a fill
  and a checksum; exits: `out 0x10` last dword, `out 0x10` checksum, hlt.
- `long64` — 64-bit mode, CPL 0, paging: one qword per page written through the page tables
  and folded back, an SSE register carried to the end; exits: `out 0x10` (mid-way), two
  `out 0x10` (checksum halves), hlt.
- `user64` — 64-bit mode, CPL 3 under `user_stub`: a heavy fill/fold loop (native on KVM),
  then INT3, a store to a supervisor page (the VMM repoints it and resumes), and HLT; exits
  (by the stub): `out 0x13` vector 3, `out 0x13` vector 14 (error code 7), `out 0x13`
  vector 13.
- `spin64` — 64-bit, CPL 0 or 3: `rcx` iterations of dec/jnz (the instruction-rate probe);
  exits: `out 0x10` at CPL 0, INT3 (`out 0x13` vector 3 by the stub) at CPL 3.
- `user_stub` — not a program: the ring-0 stub `kvmem.cpu.modes.user_mode` installs (SYSCALL
  entry at 0, 256 vector entries at 0x100 + 16 * v; every entry is one port write).

Sources are the `.S` files here (64-bit ones carry `.code64`); rebuild the `.bin` files with
`python -m kvmem.guests.build` (GNU as + objcopy), check them with `--check`.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["PORT_EXCEPTION", "PORT_RESULT", "PORT_SYSCALL", "PORT_TORN", "PROGRAMS", "program"]

PROGRAMS = ("walker", "poker", "loop", "real16", "prot32", "long64", "user64", "spin64",
            "user_stub")
PORT_RESULT = 0x10  # walker: checksum; loop: final counter; real16/prot32/long64/spin64
PORT_TORN = 0x11  # loop: a value read back that is not the one just written
PORT_SYSCALL = 0x12  # user_stub: SYSCALL (eax = number)
PORT_EXCEPTION = 0x13  # user_stub: vector (edx = error code, rcx = CR2)


def program(name: str) -> bytes:
    """The flat binary of a bundled guest program (position independent)."""
    if name not in PROGRAMS:
        raise ValueError(f"no guest program {name!r}; there are {', '.join(PROGRAMS)}")
    return resources.files(__package__).joinpath(f"{name}.bin").read_bytes()
