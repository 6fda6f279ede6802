"""`kvmem info`: the facts it prints (as JSON) agree with what `kvmapi` reads from the kernel and
with a default `kvmem.Vm()`, the missing-KVM case reports a reason, and the command runs as
`python -m kvmem info` in a fresh process.

KVM-dependent assertions take the branch this host allows; the missing-KVM branch is also
forced on every host by pointing the CLI at a device path that does not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import kvmem
from kvmem import cli, kvmapi
from kvmem.kvmapi import KVM_CAP_NR_MEMSLOTS, Kvm, kvm_available

KVM_KEYS = {
    "path",
    "usable",
    "reason",
    "api_version",
    "address_spaces",
    "smm",
    "max_slots",
    "readonly_mem",
    "manual_dirty_log_protect",
    "dirty_ring_max_bytes",
    "user_memory2",
    "guest_memfd",
    "memory_attributes",
    "vm_types",
    "max_gfn",
    "user_va_end",
    "limits_note",
}
KVM_FACTS = KVM_KEYS - {"path", "usable", "reason", "limits_note"}
SOFTWARE_KEYS = {
    "address_spaces",
    "smm",
    "max_slots",
    "readonly_mem",
    "manual_dirty_log_protect",
    "user_memory2",
    "guest_memfd",
    "memory_attributes",
    "vm_types",
    "phys_bits",
    "max_gfn",
    "user_va_end",
}

_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def info_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert cli.main(["info", "--json", *argv]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_json_has_stable_keys(capsys: pytest.CaptureFixture[str]) -> None:
    data = info_json(capsys)
    assert set(data) == {"kvmem_version", "kvm", "software", "auto_engine"}
    assert set(data["kvm"]) == KVM_KEYS
    assert set(data["software"]) == SOFTWARE_KEYS
    assert data["kvmem_version"] == kvmem.__version__
    assert data["kvm"]["path"] == kvmapi.KVM_PATH


def test_kvm_facts_agree_with_kvmapi(capsys: pytest.CaptureFixture[str]) -> None:
    kvm = info_json(capsys)["kvm"]
    reason = kvm_available()
    if reason is not None:
        assert kvm["usable"] is False
        assert isinstance(kvm["reason"], str) and kvm["reason"]
        assert all(kvm[k] is None for k in KVM_FACTS)
        return
    assert kvm["usable"] is True
    assert kvm["reason"] is None
    with Kvm() as dev:
        assert kvm["max_slots"] == dev.check_extension(KVM_CAP_NR_MEMSLOTS)
        assert kvm["api_version"] == dev.api_version() == kvmapi.KVM_API_VERSION
        caps = dev.caps()
    assert kvm["address_spaces"] == caps.address_spaces >= 1
    assert kvm["smm"] is caps.smm
    assert kvm["readonly_mem"] is caps.readonly_mem
    assert kvm["manual_dirty_log_protect"] == caps.manual_dirty_log_protect
    assert kvm["dirty_ring_max_bytes"] == caps.dirty_ring_max_bytes
    assert kvm["user_memory2"] is caps.user_memory2
    assert kvm["guest_memfd"] is caps.guest_memfd
    assert kvm["memory_attributes"] == caps.memory_attributes
    assert "default" in kvm["vm_types"] and len(kvm["vm_types"]) == caps.vm_types.bit_count()


def test_auto_engine_follows_kvm(capsys: pytest.CaptureFixture[str]) -> None:
    data = info_json(capsys)
    expected = "kvm" if kvm_available() is None else "unicorn"
    assert data["auto_engine"] == expected


def test_missing_kvm_gives_reason_and_unicorn_engine(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = str(tmp_path / "kvm")
    monkeypatch.setattr(kvmapi, "KVM_PATH", missing)
    data = info_json(capsys)
    kvm = data["kvm"]
    assert kvm["path"] == missing
    assert kvm["usable"] is False
    assert kvm["reason"] == kvm_available(missing)
    assert missing in kvm["reason"]
    assert all(kvm[k] is None for k in KVM_FACTS)
    assert data["auto_engine"] == "unicorn"
    assert set(data["software"]) == SOFTWARE_KEYS

    assert cli.main(["info"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # long paths wrap at the console width
    assert f"{missing} is not usable" in out
    assert "would pick: unicorn" in out


def test_software_model_is_a_default_vm(capsys: pytest.CaptureFixture[str]) -> None:
    sw = info_json(capsys)["software"]
    vm = kvmem.Vm()
    caps = vm.limits
    assert sw["address_spaces"] == caps.address_spaces
    assert sw["max_slots"] == caps.max_slots
    assert sw["readonly_mem"] is caps.readonly_mem
    assert sw["manual_dirty_log_protect"] == caps.manual_dirty_log_protect
    assert sw["phys_bits"] == caps.phys_bits
    assert sw["max_gfn"] == vm.limits.max_gfn
    assert sw["user_va_end"] == vm.limits.user_va_end
    assert sw["guest_memfd"] is caps.guest_memfd is True
    assert sw["user_memory2"] is True
    # modelled: PRIVATE on a sw_protected VM (KVM_MEMORY_ATTRIBUTE_PRIVATE), both VM types
    assert sw["memory_attributes"] == kvmem.Vm(vm_type="sw_protected"
                                                ).supported_memory_attributes == 1 << 3
    assert sw["vm_types"] == ["default", "sw_protected"]
    # the documented x86-with-SMM defaults
    assert (sw["address_spaces"], sw["smm"], sw["max_slots"], sw["readonly_mem"]) == (
        2,
        True,
        32764,
        True,
    )


@needs_kvm
def test_limits_agree_with_hostcaps_probe(capsys: pytest.CaptureFixture[str]) -> None:
    hostcaps = pytest.importorskip("kvmem.hostcaps")
    limits = hostcaps.probe_kvm_limits()
    kvm = info_json(capsys)["kvm"]
    assert (kvm["max_gfn"], kvm["user_va_end"], kvm["limits_note"]) == (
        limits.max_gfn,
        limits.user_va_end,
        None,
    )


@needs_kvm
def test_missing_hostcaps_leaves_limits_null(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kvmem.hostcaps", None)  # import fails: not installed
    kvm = info_json(capsys)["kvm"]
    assert kvm["max_gfn"] is None and kvm["user_va_end"] is None
    assert "not installed" in kvm["limits_note"]
    assert kvm["max_slots"] is not None


LIMITS = {"max_gfn": 0xF_FFFF_FFFF, "user_va_end": 0x7FFF_FFFF_F000}


@needs_kvm
def test_limits_come_from_hostcaps_probe(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("kvmem.hostcaps")
    fake.probe_kvm_limits = lambda: types.SimpleNamespace(**LIMITS)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvmem.hostcaps", fake)
    kvm = info_json(capsys)["kvm"]
    assert (kvm["max_gfn"], kvm["user_va_end"], kvm["limits_note"]) == (
        LIMITS["max_gfn"],
        LIMITS["user_va_end"],
        None,
    )


@needs_kvm
def test_failing_hostcaps_probe_is_reported_not_fatal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def probe() -> None:
        raise OSError(5, "probe broke")

    fake = types.ModuleType("kvmem.hostcaps")
    fake.probe_kvm_limits = probe  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvmem.hostcaps", fake)
    kvm = info_json(capsys)["kvm"]
    assert kvm["max_gfn"] is None and kvm["user_va_end"] is None
    assert "probe broke" in kvm["limits_note"]
    assert kvm["max_slots"] is not None


def test_no_subcommand_runs_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    default = capsys.readouterr().out
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out == default
    assert "max slots" in default


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_m_kvmem_info() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "80"  # the table must read well in a plain 80-column terminal
    proc = subprocess.run(
        [sys.executable, "-m", "kvmem", "info"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for words in (
        "kvmem software model",
        "address spaces",
        "max slots",
        "read-only slots",
        "manual dirty log protect",
        "dirty ring",
        "USER_MEMORY2",
        "guest_memfd",
        "memory attributes",
        "VM types",
    ):
        assert words in out, f"{words!r} missing from:\n{out}"
    engine = "kvm" if kvm_available() is None else "software"
    assert f'engine "auto" would pick: {engine}' in " ".join(out.split())
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
