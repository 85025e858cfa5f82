"""`--launcher fork|torchrun|accelerate|deepspeed`: the same trainer through four launchers gives the same run.

The embedded default with a short --max_steps and micro-batch, 2 processes each (gloo on CPU); the four runs go
side by side. The multi-node commands are checked as built (no process started).
"""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, holding_machine, launcher_env, read_history, resolve

LAUNCHERS = ("fork", "torchrun", "accelerate", "deepspeed")
MAX_STEPS, MICRO_BATCH = 16, 2
EXPECTED_COMMAND = {"fork": "fork 2 rank(s) of: ", "torchrun": "-m torch.distributed.run",
                    "accelerate": "-m accelerate.commands.launch", "deepspeed": "-m deepspeed.launcher.runner"}


def printed_command(stdout):
    """The command the launcher printed (`+ ...`) before running it."""
    lines = [line for line in stdout.splitlines() if line.startswith("+ ")]
    assert lines, "the launcher must print the exact command it runs:\n" + stdout[-2000:]
    return lines[0]


slow = pytest.mark.slow


@pytest.fixture(scope="module")
@holding_machine()
def launcher_runs(tiny_model_path, tmp_path_factory):
    """{launcher: (returncode, stdout, stderr, run_dir)}; the model is built first so the runs do not race."""
    procs = {}
    for name in LAUNCHERS:
        out = tmp_path_factory.mktemp(f"launcher-{name}")
        cmd = ["bash", str(REPO / "launch" / "train_lora.sh"), "--launcher", name, "--max_steps", str(MAX_STEPS),
               "--micro_batch_size", str(MICRO_BATCH), "--output_dir", str(out)]
        env = launcher_env(OMP_NUM_THREADS=1, PYTHONIOENCODING="ascii")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out / "tiny_lora")
    results = {}
    for name, (proc, run_dir) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = (proc.returncode, stdout, stderr, run_dir)
    return results


@slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_trains_with_two_processes(launcher_runs, launcher):
    code, stdout, stderr, run_dir = launcher_runs[launcher]
    assert code == 0, f"exit {code}\nSTDOUT:\n{stdout[-3000:]}\nSTDERR:\n{stderr[-5000:]}"
    command = printed_command(stdout)
    assert EXPECTED_COMMAND[launcher] in command, command
    history = read_history(run_dir)
    assert history["status"] == "completed" and history["metadata"]["world_size"] == 2
    assert history["records"][-1]["step"] == MAX_STEPS
    for which in ("best", "final"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_info.json"):
            assert (run_dir / which / name).exists(), f"{launcher}: {which}/{name}"


@slow
def test_accelerate_config_points_at_our_deepspeed_file(launcher_runs):
    import yaml

    run_dir = launcher_runs["accelerate"][3]
    config = yaml.safe_load((run_dir / "launch" / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert config["use_cpu"] is False, "use_cpu makes accelerate start a single process"
    ds_file = run_dir / "launch" / "deepspeed.json"  # the resolved DeepSpeed config the ranks run with
    assert config["deepspeed_config"]["deepspeed_config_file"] == str(ds_file.resolve())
    resolved = json.loads(ds_file.read_text())
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["train_batch_size"] == 2 * MICRO_BATCH
    assert "auto" not in json.dumps(resolved)


@slow
def test_deepspeed_runner_gets_a_hostfile(launcher_runs):
    code, stdout, _, run_dir = launcher_runs["deepspeed"]
    hostfile = run_dir / "launch" / "hostfile"
    assert hostfile.read_text().split() == ["localhost", "slots=2"]
    assert f"--hostfile {hostfile}" in printed_command(stdout)


@slow
def test_all_launchers_give_the_same_run(launcher_runs):
    histories = {name: read_history(launcher_runs[name][3]) for name in LAUNCHERS}
    reference = histories["torchrun"]
    for name in ("fork", "accelerate", "deepspeed"):
        other = histories[name]
        assert [r["step"] for r in other["records"]] == [r["step"] for r in reference["records"]]
        for mine, theirs in zip(other["records"], reference["records"]):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6), (name, mine["step"])
            assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-9)
        assert [e["step"] for e in other["evals"]] == [e["step"] for e in reference["evals"]]
        for mine, theirs in zip(other["evals"], reference["evals"]):
            assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-4), (name, mine["step"])
        assert other["best"]["step"] == reference["best"]["step"]
    evals = reference["evals"]
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"], "the runs must really train"


@slow
def test_the_same_adapter_weights(launcher_runs):
    from safetensors.torch import load_file

    tensors = {name: load_file(launcher_runs[name][3] / "final" / "adapter_model.safetensors") for name in LAUNCHERS}
    reference = tensors["torchrun"]
    for name in ("fork", "accelerate", "deepspeed"):
        assert tensors[name].keys() == reference.keys()
        for key, value in reference.items():
            assert (tensors[name][key] - value).abs().max().item() < 1e-4, (name, key)


# ---------------------------------------------------------------- multi-node commands (built, not run)

def test_accelerate_multi_node_config_per_node(tmp_path, monkeypatch):
    import yaml

    from finetune_launcher.launch import commands

    monkeypatch.delenv("SLURM_NODEID", raising=False)
    cfg = resolve(REPO / "configs" / "tiny_lora.yaml", {"zero_stage": 3, "output_dir": str(tmp_path)}, procs=4,
                  nnodes=2)
    options = {"--nnodes": "2", "--node-rank": "1", "--rdzv-endpoint": "10.1.2.3:29400", "--rdzv-id": "77"}
    cmd = commands.accelerate_command(sys.executable, cfg, options, tmp_path / "run_config.json")
    path = tmp_path / "tiny_lora" / "launch" / "accelerate_config_node1.yaml"
    assert cmd[cmd.index("--config_file") + 1] == str(path)
    config = yaml.safe_load(path.read_text())
    assert (config["num_machines"], config["num_processes"], config["machine_rank"]) == (2, 8, 1)
    assert (config["main_process_ip"], config["main_process_port"], config["rdzv_backend"]) == \
        ("10.1.2.3", 29400, "c10d")
    ds_file = config["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file.endswith("deepspeed_node1.json") and json.loads(open(ds_file).read())["train_batch_size"] == 32
    assert config["deepspeed_config"]["zero3_init_flag"] is True
    assert cmd[-4:] == ["--module", "finetune_launcher", "--resolved", str(tmp_path / "run_config.json")]


def test_deepspeed_multi_node_runs_its_part_without_ssh(tmp_path, monkeypatch):
    from finetune_launcher.launch import LaunchError, commands

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.setenv("FTL_HOSTS", "gpu-a,gpu-b")
    cfg = resolve(REPO / "configs" / "tiny_lora.yaml", {"output_dir": str(tmp_path)}, procs=8, nnodes=2)
    options = {"--nnodes": "2", "--node-rank": "1", "--master-addr": "gpu-a", "--master-port": "29500"}
    cmd = commands.deepspeed_command(sys.executable, cfg, options, "run_config.json")
    assert (tmp_path / "tiny_lora" / "launch" / "hostfile").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    joined = " ".join(cmd)
    assert "--no_ssh --node_rank 1" in joined and "--master_addr gpu-a --master_port 29500" in joined
    assert joined.endswith("--no_local_rank --module finetune_launcher --resolved run_config.json")
    monkeypatch.delenv("FTL_HOSTS")
    with pytest.raises(LaunchError, match="FTL_HOSTS"):
        commands.deepspeed_command(sys.executable, cfg, options, "run_config.json")


# ---------------------------------------------------------------- a launcher killed outright (kill -9)

def living(processes):
    """The processes still running (a zombie has ended: it waits only for a parent to read its status)."""
    import psutil

    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def training_ranks_under(launcher, run_dir, timeout=240):
    """The launcher's descendants (the launcher tool and the ranks) once the history shows a trained step."""
    import time

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launcher.poll() is None, f"the launch ended with {launcher.returncode} before it was killed"
        if (run_dir / "training_history.json").exists() and read_history(run_dir)["records"]:
            descendants = psutil.Process(launcher.pid).children(recursive=True)
            assert len(descendants) >= 2, descendants  # the two ranks (and torchrun)
            return descendants
        time.sleep(0.2)
    raise AssertionError("no step was trained in time")


@slow
@pytest.mark.parametrize("launcher", ["fork", "torchrun"])
def test_a_killed_launcher_takes_every_rank_along_and_leaves_no_scratch_directory(launcher, tiny_model_path, tmp_path):
    """`kill -9` of the launcher's process alone: its ranks (forked, or torchrun's workers, which torchrun runs in
    sessions of their own) end within seconds instead of training to the end of a long run, and the launch's scratch
    directory, which the killed launcher could not remove, is gone after the next launch."""
    import os
    import signal

    import psutil

    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "out"
    env = launcher_env(TMPDIR=str(temp), OMP_NUM_THREADS=1)
    args = ["--mode", "lora", "--launcher", launcher, "--no-preflight", "--output_dir", str(out)]
    with holding_machine(), open(tmp_path / "launch.log", "w") as log:
        # started as `bash launch/train_lora.sh &` starts it: SIGINT ignored (torch.multiprocessing's own death
        # signal for the ranks it forks is SIGINT, which then does nothing)
        victim = subprocess.Popen([sys.executable, "-m", "finetune_launcher.launch", *args, "--max_steps", "100000",
                                   "--logging_steps", "1", "--eval_steps", "100000"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            processes = training_ranks_under(victim, out / "tiny_lora")
        except BaseException:
            victim.kill()
            raise
        finally:
            print((tmp_path / "launch.log").read_text()[-3000:])
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        _, still = psutil.wait_procs(processes, timeout=30)
        assert not living(still), [(p.pid, p.cmdline()[:4]) for p in living(still)]
    assert [p.name for p in temp.iterdir() if p.name.startswith("ftl-launch-")], "the killed launch had a scratch dir"

    next_launch = subprocess.run([sys.executable, "-m", "finetune_launcher.launch", *args, "--dry-run"], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=300)
    assert next_launch.returncode == 0, next_launch.stdout[-2000:] + next_launch.stderr[-3000:]
    assert not [p.name for p in temp.iterdir() if p.name.startswith("ftl-launch-")]
