"""No rank outlives its launcher: a child started by the launcher asks the kernel to signal it when the launcher
dies (Linux's PR_SET_PDEATHSIG), whichever way the launcher dies, SIGKILL included."""
import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def libc():
    """The C library, loaded before a fork so that the child only calls into it; None off Linux."""
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid, signum=signal.SIGKILL, c_library=None):
    """Have the kernel send `signum` to this process when its parent `parent_pid` dies (Linux: PR_SET_PDEATHSIG),
    whichever way it dies -- SIGKILL included, where no handler of the parent can run. A child calls it first thing
    after the fork; should the parent have died before the call (the child then has another parent already), the
    child exits at once, as the signal would have ended it. No-op where prctl does not exist. `c_library`: libc(),
    loaded before the fork."""
    c_library = c_library or libc()
    if c_library is None:
        return
    c_library.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(128 + int(signum))  # not the signal itself: the parent's Python handlers are still installed here
