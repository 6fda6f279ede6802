"""What this host's KVM allows for guest memory, measured — so a `kvmem.Vm` can be made to match.

Defines:
- `HostLimits` — the numbers kvmem's validation compares against (address spaces, user slots,
  read-only slots, guest physical address bits, end of the user VA range), plus the dirty-log
  capabilities (manual-protect mask, dirty-ring size);
- `probe_kvm_limits()` — reads the capabilities and measures the two limits no capability
  reports, on a throwaway VM;
- `vm_like_host()` — a `kvmem.Vm` configured with those limits.

Why: kvmem's defaults are x86 KVM with SMM and 52-bit guest addresses. A real host may have no
SMM (1 address space), a TDP MMU bounded by the CPU's MAXPHYADDR, or a different user VA size.
The differential tests drive the same calls into the kernel and into the model, so the model
has to be configured with what the kernel actually enforces, not with what the docs promise.

How the two measured limits are found (binary searches of one-page slots, each accepted probe
deleted again, the VM closed at the end):
- largest gfn: x86 `kvm_arch_prepare_memory_region` refuses a slot whose last gfn is above
  `kvm_mmu_max_gfn() = 2^(bits-12) - 1`, so the largest gfn a one-page slot is accepted at
  gives `phys_bits`;
- end of user VA: `access_ok(hva, size)` refuses `hva + size` beyond the user range. Addresses
  and sizes are page-aligned by earlier checks, so the boundary is only observable to the page:
  `user_va_end` is the largest accepted end address, which makes kvmem's rule "refuse if
  hva + size > user_va_end" agree with the kernel for every request that reaches it.

Nothing here imports the model except `vm_like_host` (lazily), so the probe is an oracle too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kvmapi import Kvm, probe_phys_bits, probe_user_va_end

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["HostLimits", "probe_kvm_limits", "vm_like_host"]

_PAGE_SHIFT = 12
_PROBE_SLOT = 0


@dataclass(frozen=True, slots=True)
class HostLimits:
    """What this host's KVM enforces for `KVM_SET_USER_MEMORY_REGION` and dirty logging."""

    address_spaces: int  # memslot address spaces of a default VM (as_id < this)
    max_slots: int  # user slot ids are 0 .. max_slots-1 (KVM_CAP_NR_MEMSLOTS)
    readonly_mem: bool  # KVM_MEM_READONLY accepted
    phys_bits: int  # largest slot gfn is 2^(phys_bits-12) - 1
    user_va_end: int  # largest accepted hva + size
    manual_dirty_log_protect: int  # KVM_DIRTY_LOG_* bits KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 takes
    dirty_ring_max_bytes: int  # 0: no dirty ring

    @property
    def max_gfn(self) -> int:
        return (1 << (self.phys_bits - _PAGE_SHIFT)) - 1


def probe_kvm_limits(kvm: Kvm | None = None) -> HostLimits:
    """Read `/dev/kvm`'s capabilities and measure the max gfn and the user VA end on a
    throwaway VM (about a hundred one-page slot ioctls). Raises `OSError` where /dev/kvm
    cannot be used (see `kvmapi.kvm_available()`)."""
    own = kvm is None
    k = Kvm() if kvm is None else kvm
    try:
        caps = k.caps()
        with k.create_vm() as vm:
            phys_bits = probe_phys_bits(vm, _PROBE_SLOT)
            user_va_end = probe_user_va_end(vm, _PROBE_SLOT)
    finally:
        if own:
            k.close()
    return HostLimits(
        address_spaces=caps.address_spaces,
        max_slots=caps.nr_memslots,
        readonly_mem=caps.readonly_mem,
        phys_bits=phys_bits,
        user_va_end=user_va_end,
        manual_dirty_log_protect=caps.manual_dirty_log_protect,
        dirty_ring_max_bytes=caps.dirty_ring_max_bytes,
    )


def vm_like_host(limits: HostLimits | None = None) -> Vm:
    """A `kvmem.Vm` that enforces what this host's KVM enforces (`limits`, probed if None)."""
    from .vm import Vm

    lim = probe_kvm_limits() if limits is None else limits
    return Vm(
        address_spaces=lim.address_spaces,
        max_slots=lim.max_slots,
        readonly_mem=lim.readonly_mem,
        phys_bits=lim.phys_bits,
        user_va_end=lim.user_va_end,
    )
