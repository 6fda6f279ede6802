"""Run paired calls (the real kernel's, kvmem's) in a forked child: the differential tests'
check that a process other than the VM's creator gets KVM's answer (EIO) from both."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping

Call = Callable[[], object]


def errname(err: int) -> str:
    return "OK" if err == 0 else errno.errorcode.get(err, str(err))


def outcomes_in_child(calls: Mapping[str, tuple[Call, Call]]) -> dict[str, tuple[str, str]]:
    """name → (the first call's outcome, the second's), each "OK" or an errno name, as a
    forked child gets them. The child reports through a pipe and leaves without cleanup."""

    def outcome(call: Call) -> str:
        try:
            call()
        except OSError as e:
            return errname(e.errno or 0)
        return "OK"

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, ";".join(f"{name}={outcome(a)},{outcome(b)}"
                                 for name, (a, b) in calls.items()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(pid, 0)
    out: dict[str, tuple[str, str]] = {}
    for item in report.split(";"):
        name, both = item.split("=")
        first, second = both.split(",")
        out[name] = (first, second)
    return out
