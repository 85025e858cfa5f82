"""A broken run stops loudly and keeps its last good checkpoint; a killed run resumes exactly where it stopped; the
loss is normalised over the whole optimizer step across ranks and accumulation."""
import json
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import (REPO, assert_ok, kill_tree, launch_here, launcher_env, losses_by_step, read_history,
                            run_launcher, train_then_sigkill)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,what,engine", [("train_full.sh", "loss", "deepspeed"),
                                                ("train_qlora.sh", "grad norm", "ddp")])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, script, what, engine):
    """A NaN loss, or a finite loss whose gradients are NaN (an overflow in the backward pass), stops the run at
    that step: never logged as 0.0, never trained through; with DeepSpeed and with the plain ddp engine."""
    debug = "--debug_nan_at_step" if what == "loss" else "--debug_nan_grad_at_step"
    proc = run_launcher(script, "--max_steps", "8", "--save_steps", "2", "--eval_steps", "100", debug, "5",
                        "--engine", engine, "--output_dir", tmp_path, "--run_name", "nan")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert re.search(rf"step 5: {what} is (nan|inf) \(not finite\)", proc.stderr), proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr, "one message, no report wall"
    for cause in ("all labels masked", "fp16 overflow", "learning rate too high"):
        assert cause in proc.stderr, cause
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    assert (checkpoints / "step-4" / "state").is_dir()
    history = read_history(tmp_path / "nan")
    assert history["status"] == "failed" and "step 5" in history["stop_reason"]
    assert all(r["step"] < 5 for r in history["records"]), "no record of the broken step may look normal"


def assert_saved_once(history):
    """No training state or weights written twice for one step (a ZeRO-3 save of a 32B model takes minutes)."""
    saves = [(entry["step"], entry["what"]) for entry in history["saves"]]
    assert len(saves) == len(set(saves)), saves


def test_sigkilled_run_resumes_and_repeats_the_same_losses(mode_runs, tmp_path):
    """The lora-z2 case (LoRA dropout 0.1: the per-rank RNG must be restored too) killed after step 11, with
    checkpoints every 5 steps and only the newest kept, then rerun: steps 11-16 repeat the uninterrupted run's
    (which saved every 8 steps: when a run saves does not change what it trains)."""
    from tests.conftest import MODE_CASES_ARGS

    proc, reference = mode_runs["lora-z2"]
    assert_ok(proc)
    script, args = MODE_CASES_ARGS["lora-z2"]
    args = [*args, "--save_steps", "5", "--save_total_limit", "1", "--output_dir", tmp_path, "--run_name", "killed"]
    train_then_sigkill(script, args, tmp_path / "killed", 11)
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-10"
    assert (checkpoints / "step-10" / "state").is_dir()
    assert not (checkpoints / "step-5").exists(), "save_total_limit 1 keeps only the newest checkpoint"

    resumed = run_launcher(script, *args)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "step 10" in resumed.stdout
    expected, got = losses_by_step(reference), losses_by_step(tmp_path / "killed")
    assert sorted(got) == list(range(1, 17)), "every step exactly once in the history"
    for step in range(11, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    assert read_history(tmp_path / "killed")["metadata"]["resumed_at_steps"] == [10]


@pytest.mark.parametrize("launcher", ["fork", "torchrun"])
def test_usr1_to_the_launcher_alone_checkpoints_and_exits_zero(tmp_path, launcher):
    """`kill -USR1 <launcher pid>` outside Slurm (the signal reaches neither torchrun nor the ranks by itself): the
    launcher passes it on, every rank saves a checkpoint at its next step, and the run exits 0 as preempted. Both
    ways of starting ranks on one node: forked (the CPU default) and torchrun (the GPU default)."""
    cmd = ["bash", str(REPO / "launch" / "train_lora.sh"), "--launcher", launcher, "--max_steps", "200",
           "--logging_steps", "1",
           "--save_steps", "1", "--save_total_limit", "1", "--output_dir", str(tmp_path), "--run_name", "usr1"]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=out, stderr=err,
                                    start_new_session=True)  # bash execs the launcher: same pid
    history_file = tmp_path / "usr1" / "training_history.json"
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        try:
            if json.loads(history_file.read_text())["records"]:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    assert launcher.poll() is None, "the run ended before it could be signalled"
    launcher.send_signal(signal.SIGUSR1)
    try:
        code = launcher.wait(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(launcher.pid)
        raise
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert code == 0, f"exit {code}\nSTDOUT:\n{stdout[-4000:]}\nSTDERR:\n{stderr[-6000:]}"
    assert "SIGUSR1 received: passed to training rank" in stdout, stdout[-4000:]
    history = read_history(tmp_path / "usr1")
    assert history["status"] == "preempted", (history["status"], history["stop_reason"])
    step = max(r["step"] for r in history["records"])
    assert 1 <= step < 200 and f"checkpoint saved at step {step}" in history["stop_reason"]
    assert (tmp_path / "usr1" / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    assert_saved_once(history)  # the signal arrived on a save step (every step is one): one checkpoint, not two


def test_two_ranks_with_accumulation_follow_one_rank_with_the_whole_batch(tmp_path):
    """Two DeepSpeed ZeRO-2 ranks x accumulation 2 against one process with the whole batch on the ddp engine (what
    `engine: auto` runs a one-process full fine-tune with on a GPU): the same losses."""
    common = ["--max_steps", "6", "--logging_steps", "1", "--eval_fraction", "0", "--lr_scheduler", "constant"]
    one = run_launcher("train_full.sh", *common, "--micro_batch_size", "8", "--gradient_accumulation_steps", "1",
                       "--engine", "ddp", "--output_dir", tmp_path, "--run_name", "one",
                       env=launcher_env(FTL_CPU_PROCS=1))
    two = run_launcher("train_full.sh", *common, "--micro_batch_size", "2", "--gradient_accumulation_steps", "2",
                       "--output_dir", tmp_path, "--run_name", "two")
    assert_ok(one)
    assert_ok(two)
    assert read_history(tmp_path / "two")["metadata"]["world_size"] == 2
    assert read_history(tmp_path / "one")["metadata"]["engine"]["engine"] == "ddp"
    a, b = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-4), (step, a[step], b[step])


def test_eval_driven_stop_writes_its_reason_and_best_follows_the_evals(tmp_path, capsys):
    """The plateau schedule with min_eval_loss: the run stops at the first eval below it, says why in the history,
    and best/ is the eval with the lowest loss. The same command again does not train on past the stop."""
    args = ["--lr_scheduler", "plateau", "--min_eval_loss", "4.0", "--eval_steps", "4", "--max_steps", "150",
            "--logging_steps", "4", "--output_dir", tmp_path, "--run_name", "stop"]
    proc = run_launcher("train_lora.sh", *args)
    assert_ok(proc)
    history = read_history(tmp_path / "stop")
    evals = [e for e in history["evals"] if e["step"] > 0]
    assert evals[-1]["eval_loss"] < 4.0 and all(e["eval_loss"] >= 4.0 for e in evals[:-1]), evals
    assert "reached min_eval_loss 4.0" in history["stop_reason"] and history["status"] == "completed"
    assert_saved_once(history)
    assert max(r["step"] for r in history["records"]) == evals[-1]["step"] < 150
    best = min(history["evals"], key=lambda e: e["eval_loss"])
    assert history["best"]["step"] == best["step"]
    info = json.loads((tmp_path / "stop" / "best" / "training_info.json").read_text())
    assert info["step"] == best["step"]
    assert history["stopped_early_at"] == evals[-1]["step"]
    again = launch_here(capsys, *args)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"stopped early at step {evals[-1]['step']}" in again.stderr and "--resume always" in again.stderr
    assert read_history(tmp_path / "stop") == history, "the refused rerun changed nothing"
