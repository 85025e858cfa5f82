"""SIGTERM / SIGUSR1 sent to the launcher (finetune_launcher.launch) reach the training ranks, not the launcher tool
between them; inside a Slurm step the launcher ignores both. Run with a stand-in for torchrun: a tool that starts
two "ranks" in sessions of their own (as torchrun does), each with a handler installed only after a delay (the
trainer's imports) and a helper child that handles the signals too (like a forked data loader worker) and must not
get them."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

RANK = r"""
import os, signal, subprocess, sys, time
out, delay, lifetime = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
HELPER = ("import signal, sys\ngot = []\nfor s in (signal.SIGTERM, signal.SIGUSR1):\n"
          "    signal.signal(s, lambda *a: got.append(s))\nsys.stdin.read()\nsys.exit(9 if got else 0)")
helper = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE)  # catches the signals too
time.sleep(delay)  # the trainer's imports: no handler yet, a signal now would kill this rank
got = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
deadline = time.time() + lifetime
while not got and time.time() < deadline:
    time.sleep(0.05)
helper.stdin.close()
with open(os.path.join(out, "rank" + os.environ["LOCAL_RANK"]), "w") as f:
    f.write(f"{got[0] if got else 'no signal'}, helper exit {helper.wait()}")
"""

TOOL = r"""
import os, subprocess, sys
out, delay, lifetime = sys.argv[1:4]
ranks = [subprocess.Popen([sys.executable, "-c", RANK, out, delay, lifetime], start_new_session=True,
                          env=dict(os.environ, LOCAL_RANK=str(i))) for i in range(2)]
open(os.path.join(out, "started"), "w").close()
sys.exit(max(r.wait() for r in ranks))
"""

LAUNCHER = ("import os, sys, tempfile; from finetune_launcher.launch.signals import run_and_report; "
            "sys.exit(run_and_report(sys.argv[1:], dict(os.environ), os.path.join(tempfile.mkdtemp(), 'code')))")


def start(tmp_path, lifetime, **env):
    tool = tmp_path / "tool.py"
    tool.write_text(f"RANK = {RANK!r}\n{TOOL}")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PYTHONPATH=str(REPO), **env)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable, str(tool), str(tmp_path), "1.5",
                             str(lifetime)], cwd=REPO, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc


def ranks_report(tmp_path):
    return [(tmp_path / f"rank{i}").read_text() for i in range(2)]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_to_the_launcher_reaches_every_rank_and_the_launcher_exits_zero(tmp_path, sig):
    proc = start(tmp_path, lifetime=60)
    t0 = time.time()
    proc.send_signal(sig)  # before the ranks have a handler: the launcher must wait for it, not kill them
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert ranks_report(tmp_path) == [f"{sig.name}, helper exit 0"] * 2, out
    assert time.time() - t0 < 30, "the ranks stopped on the signal, not at the end of their lifetime"
    assert f"{sig.name} received: passed to training rank" in out


def test_inside_a_slurm_step_the_launcher_ignores_stop_signals(tmp_path):
    """Slurm signals every process of the step itself: the launcher must neither die nor signal the ranks again."""
    proc = start(tmp_path, lifetime=4, SLURM_STEP_ID="0")
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert ranks_report(tmp_path) == ["no signal, helper exit 0"] * 2, out


@pytest.mark.parametrize("recorded,tool_exit,expected", [("0 preempted", 1, 0), ("0", 1, 1), ("3", 1, 3),
                                                         ("2", 0, 2), ("3", 0, 3), ("0", 0, 0)])
def test_the_trainers_recorded_code_decides_the_launchers_exit(tmp_path, recorded, tool_exit, expected):
    """Under Slurm, torchrun exits 1 after passing USR1 to its workers, and after an error every rank saw alike the
    ranks exit 0 (so torchrun prints no failure report): the trainer's own record decides either way; a tool failure
    the trainer did not record stays a failure."""
    tool = tmp_path / "tool.py"
    tool.write_text(f"import os, sys\nopen(os.environ['FTL_EXIT_CODE_FILE'], 'w').write({recorded!r} + '\\n')\n"
                    f"sys.exit({tool_exit})\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), SLURM_STEP_ID="0")
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, str(tool)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected, proc.stdout + proc.stderr


def test_the_trainer_records_its_code_for_the_launcher(tmp_path, monkeypatch):
    from finetune_launcher.__main__ import exit_for_launcher

    assert exit_for_launcher(3, False) == 3  # no launcher: the code itself
    monkeypatch.setenv("FTL_EXIT_CODE_FILE", str(tmp_path / "code"))
    assert exit_for_launcher(0, True) == 0 and (tmp_path / "code").read_text() == "0 preempted\n"
    assert exit_for_launcher(3, False) == 0 and (tmp_path / "code").read_text() == "3\n"


# The default on one node: ranks forked from the launcher (finetune_launcher.launch.forked), here with a stand-in
# for the trainer's main that installs its handler after a delay (its model load) and records what reached it.
FORKED_LAUNCHER = r"""
import os, signal, sys, tempfile, time
import finetune_launcher.__main__ as trainer
from finetune_launcher.launch.forked import rank_environments
from finetune_launcher.launch.signals import StopForwarder, fork_and_report

out, delay, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
StopForwarder.GRACE_S = 1
StopForwarder.LINGER_S = 1

def stand_in(argv):
    rank = os.environ["LOCAL_RANK"]
    open(os.path.join(out, "forked" + rank), "w").close()
    if mode == "crash" and rank == "1":
        raise RuntimeError("a bug in rank 1")
    if mode == "stuck":  # a guard stopped the run (code 3) on both ranks; rank 1 then never exits
        if rank == "1":
            time.sleep(600)
        return 3, False
    time.sleep(delay)
    got = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    with open(os.path.join(out, "rank" + rank), "w") as f:
        f.write(f"{got[0] if got else 'no signal'} {argv} {os.environ['WORLD_SIZE']} {os.environ['MASTER_PORT']}")
    return 0, bool(got)

trainer.main = stand_in
envs = rank_environments(dict(os.environ), 2, 29999)
sys.exit(fork_and_report("RESOLVED.json", envs, os.path.join(tempfile.mkdtemp(), "code")))
"""


def start_forked(tmp_path, delay, mode="run"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen([sys.executable, "-c", FORKED_LAUNCHER, str(tmp_path), str(delay), mode], cwd=REPO,
                            env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_a_stop_signal_reaches_forked_ranks_once_they_catch_it_and_the_launcher_exits_zero(tmp_path):
    proc = start_forked(tmp_path, delay=1.5)
    deadline = time.time() + 60
    while not (tmp_path / "forked1").exists():  # forked, the handlers not yet installed: a signal would kill them
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert ranks_report(tmp_path) == ["SIGUSR1 ['--resolved', 'RESOLVED.json'] 2 29999"] * 2, out
    assert "SIGUSR1 received: passed to training rank" in out


def test_a_crashed_forked_rank_shows_its_traceback_and_stops_the_others(tmp_path):
    proc = start_forked(tmp_path, delay=0, mode="crash")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "RuntimeError: a bug in rank 1" in out and "Traceback" in out, out
    assert (tmp_path / "rank0").read_text().startswith("SIGTERM"), "the surviving rank is stopped, as torchrun does"


def test_a_rank_stuck_after_the_run_ended_is_killed_and_the_runs_code_kept(tmp_path):
    """Rank 0 ended the run (a guard: exit code 3) but rank 1 never exits (as a rank stuck in a teardown did): the
    launcher kills it LINGER_S later (1 s here) and exits with the run's code, instead of waiting forever."""
    proc = start_forked(tmp_path, delay=0, mode="stuck")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert "had not exited 1 s later: killed them" in out, out


def test_a_stuck_rank_under_the_launcher_tool_is_killed_and_the_runs_code_kept(tmp_path):
    """As above under a launcher tool (a stand-in for torchrun): rank 0 records code 3 and exits, rank 1 hangs."""
    tool = tmp_path / "tool.py"
    tool.write_text(STUCK_TOOL)
    launcher = LAUNCHER.replace("from finetune_launcher.launch.signals import run_and_report",
                                "from finetune_launcher.launch.signals import run_and_report, StopForwarder; "
                                "StopForwarder.LINGER_S = 1")
    proc = subprocess.run([sys.executable, "-c", launcher, sys.executable, str(tool)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "had not exited 1 s later: killed them" in proc.stdout, proc.stdout + proc.stderr


STUCK_TOOL = r"""
import os, subprocess, sys
RANK = ("import os, time\n"
        "if os.environ['LOCAL_RANK'] == '0':\n"
        "    open(os.environ['FTL_EXIT_CODE_FILE'], 'w').write('3\\n')\n"
        "else:\n"
        "    time.sleep(600)\n")
ranks = [subprocess.Popen([sys.executable, "-c", RANK], env=dict(os.environ, LOCAL_RANK=str(i))) for i in range(2)]
sys.exit(max(abs(r.wait()) for r in ranks))
"""


THREADED_PARENT = r"""
import os, sys, tempfile
from finetune_launcher.launch.forked import compute_single_threaded, rank_environments

if sys.argv[2] == "single":
    compute_single_threaded()  # what the launcher does first, before it imports torch
import torch
import finetune_launcher.__main__ as trainer
from finetune_launcher.launch.signals import fork_and_report

x = torch.randn(1500, 1500)
(x @ x).exp().sum()  # a parallel region in the launcher, on as many threads as it has
print("launcher threads", torch.get_num_threads())

def stand_in(argv):
    (x @ x).exp().sum()  # hangs in a rank forked after a parallel region on several threads
    open(os.path.join(sys.argv[1], "threads"), "w").write(str(torch.get_num_threads()))
    return 0, False

trainer.main = stand_in
sys.exit(fork_and_report("R.json", rank_environments(dict(os.environ, OMP_NUM_THREADS="2"), 1, 29998),
                         os.path.join(tempfile.mkdtemp(), "code")))
"""


def test_a_rank_forked_after_the_launcher_computed_runs_on_the_threads_it_was_given(tmp_path):
    """libgomp's thread pool does not survive fork: the launcher keeps itself on one OpenMP thread, so a forked rank
    can start a pool of its own (here 2 threads; on several threads the launcher's pool would hang it)."""
    proc = subprocess.run([sys.executable, "-c", THREADED_PARENT, str(tmp_path), "single"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launcher threads 1" in proc.stdout and (tmp_path / "threads").read_text() == "2"


def test_scratch_directories_of_dead_launchers_are_removed_and_live_ones_kept(tmp_path):
    """A launcher killed outright cannot remove its scratch directory (ftl-launch-<pid>-...): the next launch removes
    those whose launcher is gone, never one whose launcher still runs."""
    from finetune_launcher.launch.scratch import remove_orphaned_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"ftl-launch-{dead.pid}-abcd"
    live = tmp_path / f"ftl-launch-{os.getpid()}-efgh"
    unrelated = tmp_path / "ftl-launchpad"
    for path in (orphan, live, unrelated):
        path.mkdir()
        (path / "run_config.json").write_text("{}")
    remove_orphaned_scratch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name])
