"""Shared fixtures: the built tiny model, and runs of the real launchers (2 CPU processes) shared across tests."""
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Under several xdist workers on as many cores, each test process and each process it launches computes on one
# OpenMP thread: two workers' threads on 2 cores would otherwise spin against each other (in-process model tests
# ran 2-5x slower beside a launch).
ONE_THREAD_EACH = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    if ONE_THREAD_EACH:
        import torch

        torch.set_num_threads(1)


def machine(name="cpu"):
    """The machine a config is resolved for: this CPU, or a GPU type from the estimator's table (as a pre-flight
    for that GPU resolves it)."""
    from finetune_launcher.config.machine import Machine, named

    return Machine("cpu") if name == "cpu" else named(name)


def resolve(path=None, overrides=None, on="cpu", procs=2, nnodes=1, **kwargs):
    """The RunConfig a launch of `path` + `overrides` resolves to, for 2 processes on this CPU (or `on` a GPU)."""
    from finetune_launcher.config import resolve_run_config

    return resolve_run_config(path, overrides, procs_per_node=procs, nnodes=nnodes, machine=machine(on), **kwargs)


@pytest.fixture(scope="session")
def tiny_model_path():
    from finetune_launcher.models.references import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def vl_settings(**overrides):
    """The attribute-style settings the VL loaders read, for the embedded tiny Qwen3-VL (LoRA, fp32)."""
    from types import SimpleNamespace

    settings = dict(mode="lora", model="builtin:tiny-qwen3-vl", precision="fp32", zero_stage=2,
                    gradient_checkpointing=False, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                    lora_target_modules="all-linear", bnb_4bit_quant_storage="uint8", attn_implementation="sdpa",
                    trust_remote_code=False, train_merger=False, lora_vision=False, max_pixels=None, min_pixels=None,
                    compile_layers=False, engine="deepspeed", world_size=1)
    settings.update(overrides)
    return SimpleNamespace(**settings)


@pytest.fixture(scope="session")
def tiny_vl_path():
    from finetune_launcher.models.references import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen3-vl")


@pytest.fixture(scope="session")
def vl_processor(tiny_vl_path):
    from finetune_launcher.recipes.vision_language.model import load_processor

    return load_processor(vl_settings())


def launcher_env(**extra):
    env = dict(os.environ)
    env.setdefault("FTL_PYTHON", sys.executable)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # a run with compile_layers: true compiles with aot_eager here: dynamo's graphs and AOT autograd, without
    # inductor's CPU code generation (about a minute per run on 2 cores)
    env.setdefault("FTL_COMPILE_BACKEND", "aot_eager")
    if ONE_THREAD_EACH:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


MACHINE_LOCK = {"path": None}  # set per session by machine_lock_file


@pytest.fixture(scope="session", autouse=True)
def machine_lock_file(tmp_path_factory):
    MACHINE_LOCK["path"] = shared_dir(tmp_path_factory, "locks") / "machine.lock"


@contextlib.contextmanager
def flocked(path, exclusive=True):
    """An flock on `path` (created if missing) held for the block: exclusive, or shared with other holders."""
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def holding_machine(exclusive=False):
    """Every launch holds the machine shared; a test that times real steps holds it alone, so the other xdist
    worker's launches wait instead of skewing its measurement. Also a decorator: @holding_machine()."""
    if MACHINE_LOCK["path"] is None:
        yield
        return
    with flocked(MACHINE_LOCK["path"], exclusive):
        yield


def run_launcher(script, *args, env=None, timeout=300, umask=None, fresh=False):
    """Run launch/<script> ARGS; returns a CompletedProcess with the output captured. Through the tests' launch
    forkserver (tests/launch_server.py: the real launcher and ranks, without a fresh interpreter's imports), or,
    with `fresh`, a `umask`, or an environment the interpreter reads at start, exactly as a user would."""
    from tests import launch_server

    env = env or launcher_env()
    with holding_machine():
        if not (fresh or umask is not None or launch_server.needs_fresh_interpreter(env)):
            return launch_server.launch(script, args, env, timeout)
        cmd = ["bash", str(REPO / "launch" / script), *map(str, args)]
        if umask is not None:
            cmd = ["bash", "-c", f"umask {umask:03o} && exec \"$@\"", "run-launcher", *cmd]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-6000:]}")


def launch_here(capsys, *args, launcher=("--mode", "lora")):
    """finetune_launcher.launch's main in this process (what launch/train_lora.sh execs; launch/train_diffusion.sh
    passes --recipe diffusion), for checks that end before any rank starts; returns a CompletedProcess-like result."""
    from types import SimpleNamespace

    from finetune_launcher.launch.cli import main

    capsys.readouterr()
    environment = dict(os.environ)  # main() keeps its own process on one OpenMP thread, through the environment
    try:
        code = main([*launcher, *map(str, args)])
    finally:
        os.environ.clear()
        os.environ.update(environment)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def assert_refused_before_launch(proc, *needles):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "torch.distributed.run" not in output, "torchrun must not start"
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in output, (needle, output[-3000:])


def read_history(run_dir):
    return json.loads((Path(run_dir) / "training_history.json").read_text())


def shared_dir(tmp_path_factory, name):
    """A directory every pytest-xdist worker of this session sees (plain tmp without xdist), so a run that tests in
    several modules need is trained once per session, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_once(out, name, launch):
    """`launch()` (a CompletedProcess) run once per session under a lock in `out`: the first worker to ask runs it
    and records the result; the others wait for it and read the record. A launch that raises (a timeout) records
    nothing, so the next caller tries again."""
    record = out / f"{name}.result.json"
    with flocked(out / f".{name}.lock"):
        if not record.exists():
            proc = launch()
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                          "stderr": proc.stderr}))
    done = json.loads(record.read_text())
    return subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])


@pytest.fixture(scope="session")
def default_lora_run(tmp_path_factory):
    """The embedded default, unchanged, through launch/train_lora.sh, on an ASCII-only console, under umask 022."""
    out = shared_dir(tmp_path_factory, "runs")
    proc = train_once(out, "tiny_lora", lambda: run_launcher(
        "train_lora.sh", "--output_dir", out, env=launcher_env(PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C"),
        umask=0o022))
    return proc, out / "tiny_lora"


MODE_CASES = {  # name: (launcher, extra args): every mode x ZeRO stage, and one offload case
    "full-z2": ("train_full.sh", ["--zero", "2"]),
    "full-z3": ("train_full.sh", ["--zero", "3"]),
    "full-z3-offload": ("train_full.sh", ["--zero", "3", "--offload"]),
    "lora-z2": ("train_lora.sh", ["--zero", "2", "--lora_dropout", "0.1"]),  # also the SIGKILL test's reference
    # dropout as in lora-z2; layers compiled, as a GPU compiles them under ZeRO-3's per-layer gathers
    "lora-z3": ("train_lora.sh", ["--zero", "3", "--lora_dropout", "0.1", "--compile_layers", "true"]),
    "qlora-z2": ("train_qlora.sh", ["--zero", "2"]),
    "qlora-z3": ("train_qlora.sh", ["--zero", "3"]),
}
MODE_STEPS = ["--max_steps", "16", "--eval_steps", "8", "--save_steps", "8", "--logging_steps", "1",
              "--micro_batch_size", "2"]  # the loss falls to about 0.5-0.6x of its start (the tests ask < 0.75x)


class TrainedRuns:
    """runs[name] -> (CompletedProcess, run dir): each case trained on first use, once per session, so test modules
    that need one case do not train them all."""

    def __init__(self, cases, out):
        self.cases, self.out, self.done = cases, out, {}

    def __getitem__(self, name):
        if name not in self.done:
            script, args = self.cases[name]
            proc = train_once(self.out, name, lambda: run_launcher(script, *args, "--output_dir", self.out,
                                                                    "--run_name", name))
            self.done[name] = (proc, self.out / name)
        return self.done[name]


MODE_CASES_ARGS = {name: (script, [*extra, *MODE_STEPS]) for name, (script, extra) in MODE_CASES.items()}
# Vision-language and diffusion runs. vl-lora and sd-lora are the embedded defaults (logging every step, which
# changes nothing else); the others are short variants (vl-lora-ddp on the plain-PyTorch engine).
RECIPE_CASES = {
    "vl-lora": ("train_lora.sh", ["configs/tiny_vl_lora.yaml", "--logging_steps", "1"]),
    "vl-qlora": ("train_qlora.sh", ["configs/tiny_vl_qlora.yaml", "--max_steps", "16", "--eval_steps", "8",
                                    "--logging_steps", "1"]),
    "vl-lora-ddp": ("train_lora.sh", ["configs/tiny_vl_lora.yaml", "--engine", "ddp", "--max_steps", "8",
                                      "--warmup_steps", "2", "--eval_steps", "8", "--logging_steps", "1"]),
    # seed 3: its data and draw put a text-only micro-batch on one rank beside pictures on the other within its 16
    # steps (test_zero3_ran_steps_where_one_rank_had_no_image)
    "vl-lora-z3": ("train_lora.sh", ["configs/tiny_vl_lora.yaml", "--zero", "3", "--max_steps", "16",
                                     "--eval_steps", "8", "--save_steps", "8", "--logging_steps", "1", "--seed", "3"]),
    "sd-lora": ("train_diffusion.sh", ["configs/tiny_sd_lora.yaml", "--logging_steps", "1"]),
    "sd-qlora": ("train_diffusion.sh", ["configs/tiny_sd_qlora.yaml", "--max_steps", "16", "--eval_steps", "8",
                                        "--logging_steps", "1"]),
}


@pytest.fixture(scope="session")
def mode_runs(tmp_path_factory):
    return TrainedRuns(MODE_CASES_ARGS, shared_dir(tmp_path_factory, "modes"))


@pytest.fixture(scope="session")
def recipe_runs(tmp_path_factory):
    return TrainedRuns(RECIPE_CASES, shared_dir(tmp_path_factory, "recipes"))


def kill_tree(pid):
    import psutil

    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@holding_machine()
def train_then_sigkill(script, args, run_dir, at_step, timeout=300, env=None):
    """Start launch/<script> ARGS (through the tests' launch forkserver) and SIGKILL the launcher and the ranks at
    once (a node failure) as soon as the history has a record of step `at_step` or later."""
    import tempfile
    import time

    from tests import launch_server

    with tempfile.TemporaryDirectory(prefix="ftl-test-victim-") as scratch:
        victim = launch_server.start(script, args, env or launcher_env(), scratch)
        deadline = time.time() + timeout
        while time.time() < deadline and victim.is_alive():
            try:
                if max(r["step"] for r in read_history(run_dir)["records"]) >= at_step:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        launch_server.kill(victim)


def losses_by_step(run_dir):
    return {r["step"]: r["loss"] for r in read_history(run_dir)["records"]}


@pytest.fixture(scope="session")
def vl_lora_run(recipe_runs):
    """The vision-language default (configs/tiny_vl_lora.yaml, every step logged) through launch/train_lora.sh with
    2 processes, shared by the recipe's tests and the tools' tests."""
    return recipe_runs["vl-lora"]


def peak_of(profiler):
    """The maximum of live bytes over a torch.profiler run's CPU memory events (allocations positive, frees
    negative): the peak of live tensor bytes."""
    import torch

    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
