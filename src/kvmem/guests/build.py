"""Rebuild the guest programs: `python -m kvmem.guests.build` (needs GNU as and objcopy).

Each `<name>.S` beside this file is assembled and its `.text` is written as a flat binary
`<name>.bin`: with `as --64` when the source has a `.code64` directive line (64-bit code), with
`as --32` otherwise (32-bit code, and 16-bit code under `.code16`). The programs are position
independent, so no link step (and no load address) is involved. `--check` rebuilds into a
temporary directory and fails if a committed `.bin` differs from what its source assembles to.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
    return sorted(HERE.glob("*.S"))


def as_flags(src: Path) -> list[str]:
    """`--64` for a source with a `.code64` directive line, else `--32`."""
    for line in src.read_text().splitlines():
        if line.split("#", 1)[0].split() == [".code64"]:
            return ["--64"]
    return ["--32"]


def assemble(src: Path, out_dir: Path) -> Path:
    """`src` → `out_dir/<stem>.bin`."""
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (GNU binutils) is needed to build the guests")
    with tempfile.TemporaryDirectory(prefix="kvmem-guest-") as tmp:
        obj = Path(tmp) / f"{src.stem}.o"
        subprocess.run(["as", *as_flags(src), "-o", str(obj), str(src)], check=True)
        out = out_dir / f"{src.stem}.bin"
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)],
                       check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="verify the committed .bin files instead of writing them")
    args = p.parse_args(argv)
    if args.check:
        stale = []
        with tempfile.TemporaryDirectory(prefix="kvmem-guests-") as tmp:
            for src in sources():
                fresh = assemble(src, Path(tmp)).read_bytes()
                committed = HERE / f"{src.stem}.bin"
                if not committed.exists() or committed.read_bytes() != fresh:
                    stale.append(committed.name)
        if stale:
            print(f"stale: {', '.join(stale)} (run python -m kvmem.guests.build)")
            return 1
        print(f"{len(sources())} guest programs match their sources")
        return 0
    for src in sources():
        out = assemble(src, HERE)
        print(f"{src.name} -> {out.name} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
