"""Grace periods: once an update returns, no reader uses the old slot set, so the host
memory of a deleted slot may really be unmapped."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

STRESS = textwrap.dedent(
    """
    import ctypes, random, sys, threading
    import kvmem
    from kvmem import host

    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    SIZE = 1 << 20
    sys.setswitchinterval(1e-5)  # switch threads often: readers run inside every window

    vm = kvmem.Vm()
    stop = threading.Event()
    faults = [0]
    reads = [0]

    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                vm.read(rng.randrange(0, SIZE - 4096), rng.choice((8, 4096)))
                reads[0] += 1
            except kvmem.GuestAccessError:
                faults[0] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    rounds = int(sys.argv[1])
    for i in range(rounds):
        mem = host.HostMemory.anonymous(SIZE)
        mem.view()[:] = b"\\x5a" * SIZE
        vm.set_memory_region(0, 0, 0, SIZE, mem.hva)
        vm.set_memory_region(0, 0, 0, 0, 0)          # delete: returns after a grace period
        # unmap for real behind kvmem's back: a reader still on the old set would crash
        assert libc.munmap(mem.hva, SIZE) == 0
    stop.set()
    for t in threads:
        t.join()
    print(f"rounds={rounds} reads={reads[0]} faults={faults[0]}")
    """
)

# One reader is parked, deterministically, inside its copy of the slot's memory (between
# the slot lookup and the copy); another thread deletes the slot and then unmaps its memory
# behind kvmem's back. With the grace period the delete cannot return while the reader is
# parked; without it (the historic bug, patched in through the grace-period seam) the
# delete returns, the memory goes, and the reader's copy faults: the process dies.
PARKED = textwrap.dedent(
    """
    import ctypes, sys, threading
    import kvmem
    from kvmem import host

    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    SIZE = 1 << 20
    vm = kvmem.Vm()
    if sys.argv[1] == "skip":
        vm.memslots.grace_period = lambda: None
    mem = host.HostMemory.anonymous(SIZE)
    mem.view()[:] = b"\\x5a" * SIZE
    vm.set_memory_region(0, 0, 0, SIZE, mem.hva)

    inside, go, deleted = threading.Event(), threading.Event(), threading.Event()
    real_views = host.views

    def parked_views(hva, n, prot):
        inside.set()  # the lookup is done, the copy is next
        go.wait()
        return real_views(hva, n, prot)

    host.views = parked_views
    out = []
    reader = threading.Thread(target=lambda: out.append(vm.read(0x1000, 2 * 4096)))
    reader.start()
    inside.wait()

    def delete():
        vm.set_memory_region(0, 0, 0, 0, 0)
        assert libc.munmap(mem.hva, SIZE) == 0
        deleted.set()

    threading.Thread(target=delete).start()
    returned_early = deleted.wait(0.5)
    print("delete returned while the reader was inside:", returned_early, flush=True)
    go.set()
    reader.join()
    deleted.wait()
    print("reader read", out[0][:4].hex(), flush=True)
    """
)


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=240)


def test_unmap_after_delete_is_safe() -> None:
    r = run(STRESS, "1000")
    assert r.returncode == 0, f"reader touched unmapped memory: rc={r.returncode} {r.stderr}"
    assert "rounds=1000" in r.stdout
    reads = int(r.stdout.split("reads=")[1].split()[0])
    assert reads > 100, r.stdout


def test_delete_waits_for_a_reader_inside_its_copy() -> None:
    r = run(PARKED, "grace")
    assert r.returncode == 0, r.stderr
    assert "delete returned while the reader was inside: False" in r.stdout
    assert "reader read 5a5a5a5a" in r.stdout


def test_without_grace_period_the_same_program_crashes() -> None:
    """Control: the test above can fail, every time. Without the grace period the delete
    returns with the reader still inside; its copy then touches unmapped memory."""
    r = run(PARKED, "skip")
    assert "delete returned while the reader was inside: True" in r.stdout, r.stdout + r.stderr
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
