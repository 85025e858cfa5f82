"""The Slurm submission path against a real Slurm (tests/slurm/conftest.py starts one: two nodes on this host).

Jobs of the embedded default (2 nodes x 1 CPU process, gloo) run side by side: one trains to the end, one is
requeued by `scontrol requeue` while training, one gets the pre-timeout USR1 in its batch shell (what
`--signal=B:USR1@N` sends), whose trap makes the training checkpoint and requeues the job; one stops on a NaN loss
(the job must fail), and one cannot learn its head node's address (it must stop before training). The tests check the
training's own outputs (history, weights, logs), not only exit codes: a Slurm step can fail and still exit 0.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import holding_machine

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny_lora.yaml"
PLAIN_STEPS, PREEMPT_STEPS, ACT_AT_STEP = 12, 12, 4
JOB_TIMEOUT_S = 360
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def job_env(base):
    env = dict(base)
    env.update(FTL_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONIOENCODING="ascii")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def submit_cmd(*extra, config=CONFIG):
    return [sys.executable, "-m", "finetune_launcher.submit", "--config", config, *extra]


def submit(env, out_dir, max_steps, *overrides):
    proc = subprocess.run(submit_cmd("--nodes", "2", "--gpus-per-node", "0", "--time", "00:15:00",
                                     "--max_steps", str(max_steps), "--micro_batch_size", "2", "--logging_steps", "1",
                                     "--output_dir", str(out_dir), *overrides),
                          cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def scontrol(env, *args):
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=30)


def job_info(env, job_id):
    out = scontrol(env, "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def read_history(run_dir):
    try:
        return json.loads((run_dir / "training_history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def last_step(history):
    return max((r["step"] for r in history["records"]), default=0) if history else 0


class Job:
    def __init__(self, name, job_id, out_dir, max_steps, action=None):
        self.name, self.id, self.max_steps, self.action = name, job_id, max_steps, action
        self.run_dir = out_dir / "tiny_lora"
        self.log_dir = self.run_dir / "slurm"
        self.acted_at_step = None
        self.info = {}
        self.seconds = None

    def logs(self):
        parts = []
        for path in sorted(self.log_dir.glob("*")) if self.log_dir.exists() else []:
            if path.suffix in (".out", ".log"):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def batch_log(self):
        path = self.log_dir / f"job-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_logs(self):
        return sorted(self.log_dir.glob(f"*-{self.id}-node*.log"))

    def describe(self):
        return f"job {self.name} ({self.id}): {self.info}\n{self.logs()}"


@pytest.fixture(scope="module")
@holding_machine()
def jobs(slurm_cluster, tiny_model_path, tmp_path_factory):
    """Submit the jobs, requeue / signal two of them once they have trained a few steps, and wait for all to
    finish. The test cluster runs one 2-node job at a time, in submission order: the two to interrupt are submitted
    last, so they start while this loop watches them (a submission takes seconds on a loaded host: a job submitted
    first could finish before the last submission returned). A requeued job waits out Slurm's own delay
    (cred_expire + 1 s, 11 s with the test cluster's AuthInfo=cred_expire=10) before it restarts: a start forced
    earlier (StartTime=now) reaches a node that still holds the revoked credential of the job's last run, and the
    restart fails at once with exit 1."""
    _, env = slurm_cluster
    t0 = time.time()
    made = {}
    # A job whose scontrol cannot name the head node's address (a stand-in scontrol first on its PATH).
    fake_bin = tmp_path_factory.mktemp("fake-scontrol")
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: Invalid node name specified' >&2\nexit 1\n")
    (fake_bin / "scontrol").chmod(0o755)
    out = tmp_path_factory.mktemp("slurm-nohead")
    made["nohead"] = Job("nohead", submit(dict(env, PATH=f"{fake_bin}:{env['PATH']}"), out, PLAIN_STEPS), out,
                         PLAIN_STEPS)
    for name, steps, action, overrides in (
            ("plain", PLAIN_STEPS, None, ()), ("broken", PLAIN_STEPS, None, ("--debug_nan_at_step", "3")),
            ("requeue", PREEMPT_STEPS, "requeue", ()), ("signal", PREEMPT_STEPS, "usr1", ())):
        out = tmp_path_factory.mktemp(f"slurm-{name}")
        made[name] = Job(name, submit(env, out, steps, *overrides), out, steps, action)
    deadline = time.time() + JOB_TIMEOUT_S
    pending, next_state_check = set(made), 0.0
    while pending and time.time() < deadline:
        # The interruptions first, from the history file each job rewrites every step (cheap, every 0.2 s): a
        # scontrol round over all jobs can take seconds on a loaded host, long enough for a job to finish.
        for job in made.values():
            if job.action and job.acted_at_step is None and job.name in pending:
                history = read_history(job.run_dir)
                step = last_step(history) if history and history.get("status") == "running" else 0
                if step >= ACT_AT_STEP:
                    if job.action == "requeue":
                        proc = scontrol(env, "requeue", job.id)
                    else:  # what --signal=B:USR1@N delivers before the time limit: USR1 to the batch shell only
                        proc = subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], env=env,
                                              capture_output=True, text=True, timeout=30)
                    assert proc.returncode == 0, proc.stderr
                    job.acted_at_step = step
        if time.time() >= next_state_check:
            for name in sorted(pending):
                info = job_info(env, made[name].id)
                if info.get("JobState", "") in FINAL_STATES:
                    made[name].info, made[name].seconds = info, round(time.time() - t0, 1)
                    pending.discard(name)
            next_state_check = time.time() + 1.0
        time.sleep(0.2)
    for name in pending:
        made[name].info = dict(job_info(env, made[name].id), timed_out=f"not finished after {JOB_TIMEOUT_S} s")
    print("slurm jobs finished after (s): " + ", ".join(f"{j.name} {j.seconds}" for j in made.values()))
    return made


def assert_trained_to_the_end(job):
    assert job.info.get("JobState") == "COMPLETED" and job.info.get("ExitCode") == "0:0", job.describe()
    history = read_history(job.run_dir)
    assert history is not None, job.describe()
    assert history["status"] == "completed", (history["status"], history["stop_reason"], job.describe())
    steps = [r["step"] for r in history["records"]]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), f"steps repeated or out of order: {steps}"
    assert steps[-1] == job.max_steps, steps
    assert history["metadata"]["world_size"] == 2, "2 nodes x 1 process must form one world of 2"
    evals = history["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == job.max_steps
    assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals
    for which in ("best", "final"):
        assert (job.run_dir / which / "adapter_model.safetensors").stat().st_size > 0, which
    return history


# ---------------------------------------------------------------- rendering (no cluster needed)

def test_dry_run_prints_the_job_script(tmp_path):
    proc = subprocess.run(submit_cmd("--nodes", "2", "--gpus-per-node", "8", "--time", "01:00:00", "--partition",
                                     "gpu", "--account", "proj", "--mode", "lora", "--max_steps", "7",
                                     "--output_dir", str(tmp_path), "--dry-run"),
                          cwd=REPO, env=job_env(os.environ), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=01:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append",
                 "FTL_NPROC_PER_NODE=8"):
        assert line in script.splitlines(), line
    assert f"FTL_ARGS=(--mode lora {REPO / CONFIG} --max_steps 7 --output_dir {tmp_path})" in script
    for text in ("--rdzv-endpoint", "--rdzv-id \"$SLURM_JOB_ID\"", "scontrol requeue", "NCCL_NVLS_ENABLE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "--head-address", "trap on_usr1 USR1"):
        assert text in script, text
    assert not (tmp_path / "tiny_lora").exists(), "a dry run writes nothing"
    body = script.split("\n# would write")[0]
    assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0
    assert script.isascii()


@pytest.mark.parametrize("config,args", [("configs/tiny_sd_qlora.yaml", "--mode qlora --recipe diffusion"),
                                         ("configs/tiny_vl_lora.yaml", "--mode lora")])
def test_the_job_script_starts_the_configs_recipe(config, args):
    """A diffusion config's job starts the launcher with --recipe diffusion (what launch/train_diffusion.sh passes);
    a vision-language config's job is a plain LoRA launch: the recipe comes from the model."""
    proc = subprocess.run(submit_cmd("--nodes", "2", "--gpus-per-node", "8", "--time", "01:00:00", "--dry-run",
                                     config=config),
                          cwd=REPO, env=job_env(os.environ), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"FTL_ARGS=({args} {REPO / config})" in proc.stdout.splitlines(), proc.stdout[:3000]


def test_submit_refuses_a_mode_the_config_does_not_have():
    proc = subprocess.run(submit_cmd("--mode", "full", "--dry-run"), cwd=REPO, env=job_env(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "mode" in proc.stderr, proc.stderr


def test_submit_refuses_a_time_limit_shorter_than_the_checkpoint_warning():
    proc = subprocess.run(submit_cmd("--time", "4", "--dry-run"), cwd=REPO, env=job_env(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--signal-secs" in proc.stderr, proc.stderr


def test_preflight_at_submit_refuses_a_run_that_cannot_fit_before_it_queues(tmp_path):
    """Qwen3-30B full fine-tune on DeepSpeed ZeRO-3 on one node of 8 x 80 GB: the model states alone exceed the
    GPU (FSDP2, engine auto's choice there, fits)."""
    args = ["--config", "configs/qwen3-30b_full_zero3.yaml", "--nodes", "1", "--gpus-per-node", "8", "--gpu",
            "H100-80GB", "--output_dir", str(tmp_path), "--engine", "deepspeed"]
    refused = subprocess.run([sys.executable, "-m", "finetune_launcher.submit", *args], cwd=REPO,
                             env=job_env(os.environ), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "DOES NOT FIT" in refused.stderr and "nothing was submitted" in refused.stderr, refused.stderr
    assert "suggested fix" in refused.stderr and refused.stdout == ""
    assert not (tmp_path / "qwen3-30b_full_zero3").exists()
    forced = subprocess.run([sys.executable, "-m", "finetune_launcher.submit", *args, "--force",
                             "--launcher", "accelerate", "--dry-run"], cwd=REPO, env=job_env(os.environ), capture_output=True, text=True,
                            timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert "FTL_ARGS=(--mode full --launcher accelerate --force " in forced.stdout, forced.stdout
    assert forced.stdout.startswith("#!/usr/bin/env bash"), "the pre-flight goes to stderr, the script to stdout"


def test_preflight_at_submit_says_how_many_requeues_the_time_needs(tmp_path):
    proc = subprocess.run(submit_cmd("--nodes", "1", "--gpus-per-node", "8", "--gpu", "H100", "--time", "00:10:00",
                                     "--signal-secs", "60", "--max_steps", "20000", "--model", "qwen2.5-7b",
                                     "--output_dir", str(tmp_path), "--dry-run"),
                          cwd=REPO, env=job_env(os.environ), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fits" in proc.stderr, proc.stderr
    runs = re.search(r"need (\d+) runs of --time 00:10:00: the job checkpoints and requeues itself (\d+) time",
                     proc.stderr)
    assert runs and int(runs.group(1)) > 1 and int(runs.group(2)) == int(runs.group(1)) - 1, proc.stderr


def test_head_address_outside_a_job_is_a_clear_error():
    env = {k: v for k, v in job_env(os.environ).items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "finetune_launcher.submit", "--head-address"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == ""
    assert "SLURM_JOB_NODELIST" in proc.stderr and "localhost" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- against the local Slurm

def test_head_address_comes_from_scontrol(slurm_cluster):
    _, env = slurm_cluster
    cmd = [sys.executable, "-m", "finetune_launcher.submit", "--head-address"]
    ok = subprocess.run(cmd, cwd=REPO, env=job_env(dict(env, SLURM_JOB_NODELIST="n[1-2]")),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "127.0.0.1", ok.stdout + ok.stderr
    bad = subprocess.run(cmd, cwd=REPO, env=job_env(dict(env, SLURM_JOB_NODELIST="nosuchnode")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and bad.stdout == "" and "nosuchnode" in bad.stderr, bad.stdout + bad.stderr


def test_submitted_job_trains_and_writes_its_outputs(jobs):
    job = jobs["plain"]
    history = assert_trained_to_the_end(job)
    assert not history["metadata"].get("resumed_at_steps"), "nothing interrupted this job"
    assert history["records"][0]["step"] == 1
    node_logs = job.node_logs()
    assert len(node_logs) == 2, f"one log per node: {node_logs}\n{job.describe()}"
    for path in node_logs:
        text = path.read_text(errors="replace")
        assert "torch.distributed.run" in text and "--rdzv_backend c10d" in text and "--nnodes 2" in text, text
    assert f"--rdzv_id {job.id}" in node_logs[0].read_text()
    assert "training exit code 0" in job.batch_log(), job.batch_log()
    assert (job.run_dir / "training_curves.png").exists() and list((job.run_dir / "tensorboard").iterdir())


def test_the_job_exit_code_is_the_trainings(jobs):
    """A run that stops on a non-finite loss (exit 3) fails the job, on every node, with its logs."""
    job = jobs["broken"]
    assert job.info.get("JobState") == "FAILED" and job.info.get("ExitCode") != "0:0", job.describe()
    history = read_history(job.run_dir)
    assert history and history["status"] == "failed" and "step 3" in history["stop_reason"], job.describe()
    code = re.search(r"training exit code (\d+)", job.batch_log())
    assert code and code.group(1) != "0" and job.info["ExitCode"].startswith(code.group(1) + ":"), job.describe()


def test_no_head_node_address_stops_the_job_before_training(jobs):
    job = jobs["nohead"]
    assert job.info.get("JobState") == "FAILED" and job.info.get("ExitCode") == "3:0", job.describe()
    log = job.batch_log()
    assert "cannot find the head node's address" in log and "localhost" in log, log
    assert not job.node_logs() and read_history(job.run_dir) is None, "no training may start"


def assert_resumed_from_its_checkpoint(job):
    assert job.acted_at_step is not None, f"the job finished before it could be interrupted\n{job.describe()}"
    history = assert_trained_to_the_end(job)
    resumed = history["metadata"].get("resumed_at_steps")
    assert resumed, f"no resume recorded\n{job.describe()}"
    assert int(job.info.get("Restarts", "0")) >= 1, job.info
    step = resumed[0]
    assert job.acted_at_step <= step < job.max_steps, (job.acted_at_step, resumed)
    text = "\n".join(p.read_text(errors="replace") for p in job.node_logs())
    assert f"preempted: checkpoint saved at step {step}" in text, job.describe()
    assert f"resumed from {job.run_dir / 'checkpoints' / f'step-{step}'} at step {step}" in text, job.describe()
    assert "restart 1" in job.batch_log(), job.batch_log()
    return history


def test_requeued_job_resumes_from_its_checkpoint(jobs):
    assert_resumed_from_its_checkpoint(jobs["requeue"])


def test_usr1_before_the_time_limit_checkpoints_and_requeues(jobs):
    job = jobs["signal"]
    assert_resumed_from_its_checkpoint(job)
    log = job.batch_log()
    assert "USR1: time limit near" in log and f"requeueing job {job.id}" in log, log


def test_resumed_runs_match_the_uninterrupted_run_step_for_step(jobs):
    """The two interrupted jobs train the same steps as the plain one, stopped and resumed at different steps:
    resuming must not change the result."""
    plain, *interrupted = (read_history(jobs[n].run_dir) for n in ("plain", "requeue", "signal"))
    assert plain and all(interrupted)
    expected = {r["step"]: r["loss"] for r in plain["records"]}
    assert sorted(expected) == list(range(1, PLAIN_STEPS + 1)), "every step is logged"
    for name, history in zip(("requeue", "signal"), interrupted):
        resumed = history["metadata"].get("resumed_at_steps")
        assert resumed and resumed[0] >= jobs[name].acted_at_step, (name, resumed, jobs[name].acted_at_step)
        losses = {r["step"]: r["loss"] for r in history["records"]}
        assert losses.keys() == expected.keys()
        for step in losses:
            assert losses[step] == pytest.approx(expected[step], rel=1e-4), (name, step)
        assert history["evals"][-1]["eval_loss"] == pytest.approx(plain["evals"][-1]["eval_loss"], rel=1e-4)
