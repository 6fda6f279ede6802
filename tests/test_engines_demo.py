"""`kvmem demo` runs to its summary with every check passing, on each engine."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kvmem import cli, demo
from kvmem.engines import kvm_usable

KVM_REASON = kvm_usable()


@pytest.mark.parametrize("engine", [
    pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
        KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")]),
    "unicorn",
])
def test_demo_passes_its_checks(engine: str) -> None:
    out = io.StringIO()
    assert demo.main(engine, rounds=100, console=Console(file=out, width=120)) == 0
    text = out.getvalue()
    assert "all passed" in text
    assert "200 transactional slot updates under a running guest: 0 unexpected MMIO" in text
    assert "fuzzme's bug found after" in text and "pages restored per reset" in text


def test_demo_is_a_cli_command() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
