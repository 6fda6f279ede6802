"""The `kvmem` command line: `kvmem info` (the default), `kvmem demo` and `kvmem check`.

Defines:
- `main(argv)` — the console script `kvmem` and `python -m kvmem`; returns the exit code.
- `collect_info()` — the facts `kvmem info` reports, as an `Info`: what this host's `/dev/kvm`
  offers a VMM (`HostKvm`), what kvmem's software model offers by default (`SoftwareModel`),
  and which engine `auto` would pick.

Rules:
- Every KVM fact comes from `kvmapi`, the raw ioctl layer (max gfn and user VA end from
  `kvmem.hostcaps`, which measures them through `kvmapi`, where that module exists), never from
  kvmem's model: `info` is where a user compares the two, so neither may be derived from the
  other.
- `--json` prints exactly the fields of `Info` (nested by section, names stable, absent
  facts `null`); the table is a rendering of the same object, never a second lookup.
- A subcommand is one `_add_<name>(subparsers)` function that registers its parser and
  handler; the handler takes the parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from rich import box
from rich.console import Console
from rich.table import Table

from . import __version__, kvmapi
from .memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE, VM_TYPES
from .vm import Vm

__all__ = ["HostKvm", "Info", "SoftwareModel", "collect_info", "main"]

Engine = Literal["kvm", "unicorn"]
Handler = Callable[[argparse.Namespace], int]

_HOSTCAPS: Final = "kvmem.hostcaps"
_MIB: Final = 1 << 20
_PAGE_SHIFT: Final = 12
# KVM_X86_*_VM by number (bit n of KVM_CAP_VM_TYPES)
_X86_VM_TYPES: Final = ("default", "sw_protected", "sev", "sev_es", "snp", "tdx")


@dataclass(frozen=True)
class HostKvm:
    """What `/dev/kvm` offers a default VM on this host. Every field but `path`, `usable` and
    `reason` is None when KVM is not usable, and so are `max_gfn` and `user_va_end` when they
    could not be probed (`limits_note` says why)."""

    path: str
    usable: bool
    reason: str | None  # why KVM is not usable
    api_version: int | None = None
    address_spaces: int | None = None  # KVM_CAP_MULTI_ADDRESS_SPACE, where 0 means 1
    smm: bool | None = None
    max_slots: int | None = None  # KVM_CAP_NR_MEMSLOTS: user slot ids 0 .. max_slots-1
    readonly_mem: bool | None = None
    manual_dirty_log_protect: int | None = None  # mask of KVM_DIRTY_LOG_* bits accepted
    dirty_ring_max_bytes: int | None = None  # 0: no dirty ring
    user_memory2: bool | None = None
    guest_memfd: bool | None = None
    memory_attributes: int | None = None  # KVM_CAP_MEMORY_ATTRIBUTES on /dev/kvm (0: none)
    vm_types: list[str] | None = None  # KVM_CAP_VM_TYPES
    max_gfn: int | None = None
    user_va_end: int | None = None
    limits_note: str | None = None


@dataclass(frozen=True)
class SoftwareModel:
    """What a default `kvmem.Vm()` offers."""

    address_spaces: int
    smm: bool  # a vCPU may enter SMM (address space 1)
    max_slots: int
    readonly_mem: bool
    manual_dirty_log_protect: int
    user_memory2: bool  # `Vm.set_memory_region2` (KVM_SET_USER_MEMORY_REGION2)
    guest_memfd: bool  # `Vm.create_guest_memfd` and KVM_MEM_GUEST_MEMFD slots
    memory_attributes: int  # `Vm.set_memory_attributes` on a VM of a private-memory type
    vm_types: list[str]  # `Vm(vm_type=...)`
    phys_bits: int
    max_gfn: int
    user_va_end: int


@dataclass(frozen=True)
class Info:
    kvmem_version: str
    kvm: HostKvm
    software: SoftwareModel
    auto_engine: Engine  # what `engine="auto"` picks: kvm where usable, else unicorn

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# facts


def _probe_limits() -> tuple[int | None, int | None, str | None]:
    """(max gfn, user VA end, note) from `kvmem.hostcaps.probe_kvm_limits()` if that module
    exists; the note says why a value is missing."""
    try:
        hostcaps = importlib.import_module(_HOSTCAPS)
    except ModuleNotFoundError as e:
        if e.name != _HOSTCAPS:
            raise
        return None, None, f"{_HOSTCAPS} is not installed"
    probe = getattr(hostcaps, "probe_kvm_limits", None)
    if probe is None:
        return None, None, f"{_HOSTCAPS} has no probe_kvm_limits()"
    try:
        limits: object = probe()
    except Exception as e:  # a diagnostic command reports a failed probe, it does not die of it
        return None, None, f"{_HOSTCAPS}.probe_kvm_limits() failed: {e}"
    max_gfn = _int_field(limits, "max_gfn")
    user_va_end = _int_field(limits, "user_va_end")
    missing = [n for n, v in (("max gfn", max_gfn), ("user VA end", user_va_end)) if v is None]
    note = f"{_HOSTCAPS}.probe_kvm_limits() gave no {' or '.join(missing)}" if missing else None
    return max_gfn, user_va_end, note


def _int_field(obj: object, name: str) -> int | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _host_kvm() -> HostKvm:
    path = kvmapi.KVM_PATH
    reason = kvmapi.kvm_available(path)
    if reason is None:
        try:
            with kvmapi.Kvm(path) as kvm:
                version = kvm.api_version()
                caps = kvm.caps()
        except OSError as e:  # usable a moment ago; report, do not crash
            reason = f"{path} is not usable: {e}"
    if reason is not None:
        return HostKvm(path, usable=False, reason=reason)
    max_gfn, user_va_end, note = _probe_limits()
    return HostKvm(
        path=path,
        usable=True,
        reason=None,
        api_version=version,
        address_spaces=caps.address_spaces,
        smm=caps.smm,
        max_slots=caps.nr_memslots,
        readonly_mem=caps.readonly_mem,
        manual_dirty_log_protect=caps.manual_dirty_log_protect,
        dirty_ring_max_bytes=caps.dirty_ring_max_bytes,
        user_memory2=caps.user_memory2,
        guest_memfd=caps.guest_memfd,
        memory_attributes=caps.memory_attributes,
        vm_types=[name for bit, name in enumerate(_X86_VM_TYPES) if caps.vm_types >> bit & 1],
        max_gfn=max_gfn,
        user_va_end=user_va_end,
        limits_note=note,
    )


def _software_model() -> SoftwareModel:
    vm = Vm()
    caps = vm.limits
    return SoftwareModel(
        address_spaces=caps.address_spaces,
        smm=caps.address_spaces > 1,
        max_slots=caps.max_slots,
        readonly_mem=caps.readonly_mem,
        manual_dirty_log_protect=caps.manual_dirty_log_protect,
        user_memory2=callable(getattr(vm, "set_memory_region2", None)),
        guest_memfd=caps.guest_memfd,
        memory_attributes=max(Vm(vm_type=t).supported_memory_attributes for t in VM_TYPES),
        vm_types=list(VM_TYPES),
        phys_bits=caps.phys_bits,
        max_gfn=vm.limits.max_gfn,
        user_va_end=vm.limits.user_va_end,
    )


def collect_info() -> Info:
    kvm = _host_kvm()
    return Info(
        kvmem_version=__version__,
        kvm=kvm,
        software=_software_model(),
        auto_engine="kvm" if kvm.usable else "unicorn",
    )


# ---------------------------------------------------------------------------------------------
# rendering

_NA: Final = "[dim]—[/dim]"


def _yes_no(value: bool | None) -> str:
    if value is None:
        return _NA
    return "[green]yes[/green]" if value else "[red]no[/red]"


def _num(value: int | None, fmt: str = "") -> str:
    return _NA if value is None else format(value, fmt)


def _hex(value: int | None) -> str:
    return _num(value, "#x")


def _gfn(max_gfn: int | None) -> str:
    if max_gfn is None:
        return _NA
    bits = (max_gfn + 1).bit_length() - 1 + _PAGE_SHIFT
    return f"{max_gfn:#x} ({bits}-bit)"


def _protect_mask(mask: int | None) -> str:
    if mask is None:
        return _NA
    names = [
        name
        for bit, name in (
            (kvmapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, "ENABLE"),
            (kvmapi.KVM_DIRTY_LOG_INITIALLY_SET, "INITIALLY_SET"),
        )
        if mask & bit
    ]
    return f"{mask:#x} {'|'.join(names)}" if names else f"[red]no[/red] ({mask:#x})"


def _ring(nbytes: int | None) -> str:
    if nbytes is None:
        return _NA
    if nbytes == 0:
        return "[red]no[/red]"
    size = f"{nbytes // _MIB} MiB" if nbytes % _MIB == 0 else f"{nbytes} bytes"
    return f"up to {size} per vCPU"


def _attributes(mask: int | None) -> str:
    if mask is None:
        return _NA
    if mask == 0:
        return "[red]no[/red]"
    return "PRIVATE" if mask == KVM_MEMORY_ATTRIBUTE_PRIVATE else f"{mask:#x}"


def _names(names: list[str] | None) -> str:
    return _NA if names is None else ", ".join(names)


def _render(info: Info, console: Console) -> None:
    kvm, sw = info.kvm, info.software
    table = Table(
        title=f"kvmem {info.kvmem_version} — what this host offers a VMM",
        caption="—: not reported (KVM) or not modelled (kvmem)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("")
    table.add_column(f"KVM ({kvm.path})")
    table.add_column("kvmem software model")
    rows: list[tuple[str, str, str]] = [
        ("usable", _yes_no(kvm.usable), _yes_no(True)),
        ("KVM API version", _num(kvm.api_version), _NA),
        ("address spaces", _num(kvm.address_spaces), _num(sw.address_spaces)),
        ("SMM", _yes_no(kvm.smm), _yes_no(sw.smm)),
        ("max slots", _num(kvm.max_slots), _num(sw.max_slots)),
        ("read-only slots", _yes_no(kvm.readonly_mem), _yes_no(sw.readonly_mem)),
        (
            "manual dirty log protect",
            _protect_mask(kvm.manual_dirty_log_protect),
            _protect_mask(sw.manual_dirty_log_protect),
        ),
        ("dirty ring", _ring(kvm.dirty_ring_max_bytes), _NA),
        ("USER_MEMORY2", _yes_no(kvm.user_memory2), _yes_no(sw.user_memory2)),
        ("guest_memfd", _yes_no(kvm.guest_memfd), _yes_no(sw.guest_memfd)),
        ("memory attributes", _attributes(kvm.memory_attributes),
         _attributes(sw.memory_attributes) + " (sw_protected)"),
        ("VM types", _names(kvm.vm_types), _names(sw.vm_types)),
        ("max gfn", _gfn(kvm.max_gfn), _gfn(sw.max_gfn)),
        ("user VA end", _hex(kvm.user_va_end), _hex(sw.user_va_end)),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if kvm.reason is not None:
        console.print(f"[red]KVM:[/red] {kvm.reason}", highlight=False)
    if kvm.limits_note is not None:
        console.print(f"[dim]max gfn / user VA end: {kvm.limits_note}[/dim]", highlight=False)
    why = f"{kvm.path} is usable" if kvm.usable else f"{kvm.path} is not usable"
    console.print(f'engine "auto" would pick: [bold]{info.auto_engine}[/bold] ({why})')


# ---------------------------------------------------------------------------------------------
# commands


def _info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        json.dump(info.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _render(info, Console(highlight=False))
    return 0


def _add_info(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "info",
        help="what /dev/kvm and kvmem's software model offer a VMM (the default command)",
        description="Report whether /dev/kvm is usable and its memory capabilities, beside "
        "the defaults of kvmem's software model.",
    )
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.set_defaults(handler=_info)


def _check(args: argparse.Namespace) -> int:
    from .check import report  # loaded on demand: `info` need not import the checker

    console = Console(highlight=False)
    if args.list:
        return report.list_scenarios(console)
    if args.replay is not None:
        return report.replay_file(args.replay, console)
    return report.run(args.scenarios, console, bound=args.bound, bugs=args.bugs,
                      save_dir=args.save_dir, max_schedules=args.max_schedules,
                      json_path=args.json)


def _add_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="explore thread interleavings of kvmem's protocols (the concurrency checker)",
        description="Run each scenario's threads under a deterministic scheduler, every "
        "schedule with at most BOUND preemptions, and report the schedules explored, the "
        "time and the verdict. A failing schedule is printed and saved as JSON; "
        "`--replay FILE` runs it again. Exit status: 0 all passed (and, with --bugs, every "
        "bug was caught); 1 otherwise.",
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help="scenario names (default: all; see --list)")
    parser.add_argument("--bound", type=int, default=2, metavar="N",
                        help="preemption bound (default 2)")
    parser.add_argument("--bugs", action="store_true",
                        help="also run the bug variants: each must be caught")
    parser.add_argument("--save-dir", default=".", metavar="DIR",
                        help="where failing schedules are saved (default: .)")
    parser.add_argument("--max-schedules", type=int, default=None, metavar="N",
                        help="stop a scenario after N schedules (verdict: incomplete)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--replay", metavar="FILE",
                        help="replay a saved failing schedule (exit 1 if it fails again, "
                        "0 if it now passes, 2 if the code no longer follows it)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.set_defaults(handler=_check)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main  # loaded on demand: it starts engines and threads

    return demo_main(args.engine, args.rounds)


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the bundled guests: live slot reconfiguration, write tracking, dirty logs",
        description="Boot the bundled guest programs on an engine and show, live, atomic "
        "slot updates under a running guest (vs the naive sequence), write tracking and "
        "dirty-log rounds.",
    )
    parser.add_argument("--engine", choices=("auto", "kvm", "unicorn"), default="auto",
                        help="where guests run (auto: KVM when /dev/kvm works, else Unicorn)")
    parser.add_argument("--rounds", type=int, default=1000,
                        help="split+merge pairs under the running guest (default 1000)")
    parser.set_defaults(handler=_demo)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmem",
        description="KVM's guest-memory subsystem in Python. Without a command: `info`.",
    )
    parser.add_argument("--version", action="version", version=f"kvmem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(subparsers)
    _add_demo(subparsers)
    _add_check(subparsers)
    # no subcommand: `info` with its defaults
    parser.set_defaults(handler=_info, json=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)
