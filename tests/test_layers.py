"""The layer order of `src/kvmem`: every module imports only from layers below its own
(or from inside its own package) — never upward, not even under `TYPE_CHECKING` or inside
a function. Read from the source with `ast`, so the shape cannot drift back."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kvmem"

# bottom first; a module may import from any earlier layer
LAYERS: list[set[str]] = [
    {"uapi", "errors", "sync", "_pindex", "kvmapi", "guests"},  # no kvmem imports
    {"args", "contract", "cpu"},  # argument checks; the engine data; x86 vCPU state
    {"host", "dirty", "memattrs"},  # host mappings and their invalidations; dirty bitmaps;
    # memory attributes of gfns
    {"slots"},  # MemorySlot, SlotSet, KVM's rules, the change-kind table
    {"memslots"},  # published slot sets, SRCU, slots_lock, lookups
    {"access", "gmem"},  # the accessor path + hva cache; guest_memfd files
    {"mmu"},  # invalidations, stage-2, write-track counters, faults
    {"pfncache", "pagetrack"},  # given memslots and the mmu
    {"vm"},  # the public face
    {"engines", "hostcaps"},  # what runs guests on a Vm; probes of /dev/kvm
    {"check", "demo"},  # the concurrency checker; the demo
    {"__init__"},  # the package's public names
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def component(path: Path) -> str:
    """The top-level piece of kvmem a file belongs to: `mmu`, `engines`, `cpu`..."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_components(path: Path) -> set[tuple[str, int]]:
    """(component, line) of every kvmem module `path` imports, anywhere in the file."""
    return imports_of(path.read_text(), list(path.relative_to(SRC).parent.parts))


def imports_of(text: str, package: list[str]) -> set[tuple[str, int]]:
    """(component, line) of every kvmem import in `text`, a module of kvmem's `package`
    ([] for kvmem itself, ["engines"] for kvmem.engines)."""
    out: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 \
                    else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                if target:
                    out.add((target[0], node.lineno))
                else:  # `from . import x` at the top of kvmem (`__version__`: the package's)
                    out.update((_module(alias.name), node.lineno) for alias in node.names)
            elif node.module and node.module.split(".")[0] == "kvmem":
                parts = node.module.split(".")
                if len(parts) > 1:
                    out.add((parts[1], node.lineno))
                else:
                    out.update((_module(alias.name), node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kvmem" and len(parts) > 1:
                    out.add((parts[1], node.lineno))
    return out


def test_every_module_has_a_layer() -> None:
    missing = sorted({component(p) for p in SRC.rglob("*.py")} - set(LEVEL))
    assert missing == [], f"add these to LAYERS: {missing}"


def _module(name: str) -> str:
    return "__init__" if name.startswith("__") else name.split(".")[0]


def violations(name: str, mine: str, imports: set[tuple[str, int]]) -> list[str]:
    wrong = []
    for other, line in sorted(imports, key=lambda x: x[1]):
        if other == mine:
            continue  # inside one package
        if other not in LEVEL:
            wrong.append(f"{name}:{line} imports unknown kvmem.{other}")
        elif LEVEL[other] >= LEVEL[mine]:
            wrong.append(f"{name}:{line} ({mine}, layer {LEVEL[mine]}) imports {other} "
                         f"(layer {LEVEL[other]})")
    return wrong


def test_imports_only_look_down() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        wrong += violations(str(path.relative_to(SRC)), component(path),
                            imported_components(path))
    assert wrong == [], "\n".join(wrong)


def test_an_upward_import_is_found_wherever_it_hides() -> None:
    """The test above can fail: upward imports under TYPE_CHECKING, inside a function, or
    absolute, in a subpackage, are all reported."""
    hidden = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .vm import Vm\n"
              "def f():\n    import kvmem.pfncache\n")
    assert violations("mmu.py", "mmu", imports_of(hidden, [])) == [
        "mmu.py:3 (mmu, layer 6) imports vm (layer 8)",
        "mmu.py:5 (mmu, layer 6) imports pfncache (layer 7)"]
    assert violations("engines/x.py", "engines",
                      imports_of("from ..check import explore\nfrom . import kvm\n",
                                 ["engines"])) == [
        "engines/x.py:1 (engines, layer 9) imports check (layer 10)"]
