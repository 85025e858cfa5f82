"""The benchmarks end a run with every process of it: torchrun starts each rank in a session of its own, and a rank
that outlived its killed launcher would train on beside the next case (bench/benchlib.py: stop_group)."""
import os
import subprocess
import sys
import time

from bench.benchlib import stop_group

TREE = """
import subprocess, sys, time
# like torchrun: the worker in a session of its own
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped by init) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_group_ends_ranks_in_sessions_of_their_own():
    launcher = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    rank = int(launcher.stdout.readline())
    assert alive(rank) and os.getsid(rank) != launcher.pid
    stop_group(launcher)
    deadline = time.time() + 10
    while alive(rank) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(rank)


BENCH = """
import sys, time
sys.path.insert(0, {repo!r})
from bench.benchlib import start_case
import subprocess
case = start_case([sys.executable, "-c", {tree!r}], stdout=subprocess.PIPE, text=True)
print(case.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def test_a_stopped_benchmark_ends_its_running_case():
    """`timeout` stops the benchmark with SIGTERM; the case it was running (launcher, torchrun, ranks: sessions of
    their own) must end with it."""
    import signal

    from tests.conftest import REPO

    bench = subprocess.Popen([sys.executable, "-c", BENCH.format(repo=str(REPO), tree=TREE)], stdout=subprocess.PIPE,
                             text=True)
    rank = int(bench.stdout.readline())
    assert alive(rank)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=20) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while alive(rank) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(rank)
