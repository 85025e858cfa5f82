"""The launcher behind launch/train_*.sh: validate the run config, count GPUs, pick a free port, run the
pre-flight estimate, then print and run the torchrun (or accelerate / deepspeed) command. Exit code = the trainer's.

usage: python -m train.launch --mode lora|qlora|full [CONFIG.yaml] [launcher options] [--key value ...]
launcher options:
  --launcher torchrun|accelerate|deepspeed   how processes are started (default torchrun)
  --nproc-per-node N     processes per node (default: GPU count; 2 on a CPU machine)
  --nnodes N --node-rank R --master-addr HOST --master-port P   multi-node (Slurm sets these for you)
  --rdzv-endpoint HOST:PORT --rdzv-id ID                         torchrun c10d rendezvous (multi-node)
  --force                launch even when the pre-flight estimate says the run will not fit
  --no-preflight         skip the estimate
  --dry-run              print the command and exit
Anything else is a run-config override (--lora_r 8, --zero 3, --offload, --max_steps 100, ...).
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from train import REPO_ROOT
from train.console import ascii_safe, make_console_safe

LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
VALUE_OPTIONS = {"--mode", "--launcher", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                 "--master-port", "--rdzv-endpoint", "--rdzv-id"}
FLAG_OPTIONS = {"--force", "--no-preflight", "--dry-run"}


class LaunchError(ValueError):
    pass


def parse_launch_args(argv):
    options = {"--launcher": "torchrun"}
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if arg in VALUE_OPTIONS:
            if i + 1 >= len(argv):
                raise LaunchError(f"{arg} needs a value")
            options[arg], i = argv[i + 1], i + 2
        elif arg in FLAG_OPTIONS:
            options[arg], i = True, i + 1
        elif not arg.startswith("--") and config_path is None and not overrides:
            config_path, i = arg, i + 1
        else:
            overrides.append(arg)
            i += 1
    if options["--launcher"] not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{options['--launcher']}'")
    mode = options.get("--mode")
    if mode not in ("lora", "qlora", "full"):
        raise LaunchError("--mode must be lora, qlora or full")
    config_path = config_path or str(REPO_ROOT / "configs" / f"tiny_{mode}.yaml")
    return options, config_path, overrides


def gpu_count():
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def processes_per_node(options):
    if "--nproc-per-node" in options:
        return int(options["--nproc-per-node"])
    gpus = gpu_count()
    return gpus if gpus > 0 else int(os.environ.get("FTL_CPU_PROCS", "2"))


def launch_env(nproc):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, nproc))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Never NVLink multicast (NVLS): it hangs or is refused on shared hosts.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return env


def trainer_args(config_path, overrides):
    return ["-m", "train", "--config", str(config_path), *overrides]


def torchrun_command(python, nproc, options, config_path, overrides):
    from train.engine import free_port

    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if "--rdzv-endpoint" in options:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", options["--rdzv-endpoint"], "--rdzv_id", options.get("--rdzv-id", "ftl")]
    else:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--node_rank", options.get("--node-rank", "0"),
                "--master_addr", options.get("--master-addr", "127.0.0.1"),
                "--master_port", options.get("--master-port", str(free_port()))]
    return cmd + trainer_args(config_path, overrides)


def build_command(options, nproc, config_path, overrides, run_dir):
    python = sys.executable
    launcher = options["--launcher"]
    if launcher == "torchrun":
        return torchrun_command(python, nproc, options, config_path, overrides)
    from train import launchers

    if launcher == "accelerate":
        return launchers.accelerate_command(python, nproc, options, config_path, overrides, run_dir)
    return launchers.deepspeed_command(python, nproc, options, config_path, overrides, run_dir)


def main(argv=None):
    make_console_safe()
    from train.config import ConfigError, load_config, parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    try:
        options, config_path, overrides = parse_launch_args(argv)
        config = load_config(config_path, parse_overrides(overrides))
        if config["mode"] != options["--mode"]:
            raise LaunchError(f"{config_path} has mode: {config['mode']}, but this is the {options['--mode']} "
                              f"launcher; use launch/train_{config['mode']}.sh or change mode")
    except (LaunchError, ConfigError) as error:
        print(ascii_safe(f"error: {error}"), file=sys.stderr)
        return 2
    nproc = processes_per_node(options)
    nnodes = int(options.get("--nnodes", "1"))
    if not options.get("--no-preflight"):
        from train.preflight import preflight

        verdict = preflight(config, nproc, nnodes)
        if verdict is not None and not verdict.fits and not options.get("--force"):
            print(ascii_safe(f"error: {verdict.refusal}"), file=sys.stderr)
            return 4
    run_dir = Path(config["output_dir"]) / config["run_name"]
    cmd = build_command(options, nproc, config_path, overrides, run_dir)
    print(ascii_safe("+ " + " ".join(shlex.quote(c) for c in cmd)), flush=True)
    if options.get("--dry-run"):
        return 0
    return run_and_report(cmd, launch_env(nproc))


def run_and_report(cmd, env):
    """Run the launcher command; return the trainer's own exit code (torchrun turns every failure into 1)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftl-") as scratch:
        code_file = Path(scratch) / "exit_code"
        env = dict(env, FTL_EXIT_CODE_FILE=str(code_file))
        returncode = subprocess.run(cmd, env=env).returncode
        if returncode != 0 and code_file.exists():
            text = code_file.read_text().strip()
            if text.isdigit() and int(text) != 0:
                return int(text)
        return returncode


if __name__ == "__main__":
    sys.exit(main())
