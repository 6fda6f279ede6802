"""Guest programs bundled with kvmem, and the CPU mode they run in.

CPU mode: 32-bit protected mode, flat 4 GiB code and data segments, CPL 0, no paging, no
IDT, interrupts off — what `EngineVcpu.start(entry, regs)` sets up on every engine. It is
the smallest mode in which one binary behaves identically on KVM and on Unicorn with no
page tables to build. On this project's hosts KVM emulates ring-0 code (~0.5 M
instructions/s), so the programs touch one word per page where they walk memory; Unicorn
runs them natively fast. Inputs are registers; results are port writes and memory.

Programs:
- `walker` — writes `addr ^ seed ^ pass` at every stride of a range and folds it back into a
  checksum; exits: `out 0x10` checksum, hlt.
- `poker` — MMIO and port reads and writes of widths 1, 2 and 4, storing what it read into
  RAM; exits: 5 MMIO and 4 port accesses (see poker.S), hlt.
- `loop` — writes a counter to a page and reads it back, n times or until kicked; exits:
  `out 0x11` with the value read on a torn access, `out 0x10` counter, hlt.

Sources are the `.S` files here; rebuild the `.bin` files with
`python -m kvmem.guests.build` (GNU as + objcopy), check them with `--check`.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["PORT_RESULT", "PORT_TORN", "PROGRAMS", "program"]

PROGRAMS = ("walker", "poker", "loop")
PORT_RESULT = 0x10  # walker: checksum; loop: final counter
PORT_TORN = 0x11  # loop: a value read back that is not the one just written


def program(name: str) -> bytes:
    """The flat binary of a bundled guest program (position independent)."""
    if name not in PROGRAMS:
        raise ValueError(f"no guest program {name!r}; there are {', '.join(PROGRAMS)}")
    return resources.files(__package__).joinpath(f"{name}.bin").read_bytes()
