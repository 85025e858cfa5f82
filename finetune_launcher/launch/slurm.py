"""Submit a training run to Slurm: render launch/slurm/train.sbatch for a run config and a few flags, then sbatch it.

usage: ftl submit --config CONFIG.yaml [--nodes N] [--gpus-per-node G] [--time HH:MM:SS]
                  [--partition P] [--account A] [--mode lora|qlora|full] [--dry-run] [--key value ...]
       (the same: python -m finetune_launcher.submit ..., bash launch/submit.sh ...)
  --nodes N            nodes (default 1); one task per node runs torchrun with G processes
  --gpus-per-node G    GPUs (= training processes) per node (default 8); 0 on a CPU cluster: --nproc-per-node
                       processes per node (default 1) over gloo
  --nproc-per-node P   processes per node when it should differ from G
  --cpus-per-task C    CPUs for each node's task (sbatch --cpus-per-task)
  --time T             time limit (default 04:00:00)
  --partition P / --account A / --job-name NAME / --qos Q
  --signal-secs S      Slurm sends USR1 S seconds before the time limit (default 300): the training checkpoints
                       and the job requeues itself, then resumes from the checkpoint
  --mode M             lora, qlora or full; defaults to the config's mode and must agree with it
  --gpu TYPE           the nodes' GPU type (H100-80GB, A100-80GB, ...: python tools/estimate_time.py --help):
                       the pre-flight estimate runs here, before the job queues, and refuses (exit 4) a run that
                       will not fit; it also says how many requeues the predicted time needs within --time
  --force              submit (and launch) even when the pre-flight says it will not fit
  --no-preflight       no estimate, here or on the nodes
  --launcher L         torchrun (default), accelerate or deepspeed, on every node
  --sbatch-arg ARG     any other sbatch option, repeatable (--sbatch-arg=--exclusive)
  --dry-run            print the script (and the sbatch command) instead of submitting
Anything else is a run-config override passed to the trainer (--max_steps 100, --lora_r 8, ...).
The script is written to outputs/<run>/slurm/job.sbatch; Slurm's logs go next to it: job-<id>.out for the batch
script, <name>-<id>-node<i>.log for each node (appended to across requeues).

python -m finetune_launcher.submit --head-address   (used inside the job) prints the first node's address, or exits 3.
(python -m finetune_launcher.launch.slurm is the same command.)
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from finetune_launcher import exit_codes, recipe_table
from finetune_launcher.resources import PACKAGE_DIR, resource

TEMPLATE = "launch/slurm/train.sbatch"


class SubmitError(ValueError):
    pass


# ---------------------------------------------------------------- inside the job: the rendezvous host

def run_scontrol(*args):
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmitError("scontrol is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"scontrol {' '.join(args)} did not answer in 60 s") from None
    if proc.returncode != 0:
        raise SubmitError(f"scontrol {' '.join(args)} failed (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def head_address(env=None):
    """The first node of the allocation (`scontrol show hostnames`) and its NodeAddr (`scontrol show node`)."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SubmitError("SLURM_JOB_NODELIST is not set: this must run inside a Slurm job")
    hosts = run_scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise SubmitError(f"scontrol show hostnames {nodelist} printed no host")
    head = hosts[0]
    match = re.search(r"\bNodeAddr=(\S+)", run_scontrol("show", "node", head))
    if not match or match.group(1) in ("(null)", ""):
        raise SubmitError(f"scontrol show node {head} gives no NodeAddr")
    return match.group(1)


def print_head_address():
    try:
        print(head_address())
    except SubmitError as error:
        print(f"error: cannot find the head node's address for the rendezvous: {error}. Stopping rather than "
              f"falling back to localhost, where every node would form a world of its own and hang.",
              file=sys.stderr)
        return exit_codes.NO_HEAD_NODE
    return 0


# ---------------------------------------------------------------- rendering

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m finetune_launcher.submit", add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nproc-per-node", type=int)
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--job-name")
    parser.add_argument("--mode", choices=("lora", "qlora", "full"))
    parser.add_argument("--signal-secs", type=int, default=300)
    parser.add_argument("--sbatch-arg", action="append", default=[])
    parser.add_argument("--gpu")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-preflight", action="store_true")
    parser.add_argument("--launcher", choices=("torchrun", "accelerate", "deepspeed"))
    parser.add_argument("--dry-run", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(__doc__)
        sys.exit(0)
    if not args.config:
        raise SubmitError("--config is required (a run config, e.g. configs/tiny_lora.yaml)")
    if args.nodes < 1:
        raise SubmitError("--nodes must be at least 1")
    if args.gpus_per_node < 0 or (args.nproc_per_node is not None and args.nproc_per_node < 1):
        raise SubmitError("--gpus-per-node must be >= 0 and --nproc-per-node >= 1")
    if args.signal_secs < 30:
        raise SubmitError("--signal-secs must leave the training at least 30 s to checkpoint")
    limit = time_limit_seconds(args.time)
    if limit is not None and args.signal_secs >= limit:
        raise SubmitError(f"--time {args.time} is not longer than --signal-secs {args.signal_secs}: the job would be "
                          f"told to checkpoint and requeue at once; raise --time or lower --signal-secs")
    return args, overrides


def time_limit_seconds(text):
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for UNLIMITED or unknown."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def sbatch_options(args, job_name, log_dir, workdir):
    opts = [f"--job-name={job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    if args.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        opts.append(f"--cpus-per-task={args.cpus_per_task}")
    opts.append(f"--time={args.time}")
    for name in ("partition", "account", "qos"):
        if getattr(args, name):
            opts.append(f"--{name}={getattr(args, name)}")
    opts += ["--requeue", f"--signal=B:USR1@{args.signal_secs}", "--open-mode=append",
             f"--output={log_dir}/job-%j.out", f"--chdir={workdir}"]
    return opts + list(args.sbatch_arg)


def render(template, sbatch_opts, values):
    """The template with its #SBATCH block replaced by `sbatch_opts` and each `NAME=...` line of `values` set."""
    out, placed = [], False
    for line in template.splitlines():
        if line.startswith("#SBATCH"):
            if not placed:
                out += [f"#SBATCH {opt}" for opt in sbatch_opts]
                placed = True
            continue
        name = line.split("=", 1)[0]
        if name in values and "=" in line:
            out.append(f"{name}={values[name]}")
            continue
        out.append(line)
    missing = [n for n in values if not any(l.startswith(n + "=") for l in out)]
    if missing or not placed:
        raise SubmitError(f"{resource(TEMPLATE)} lacks the lines to render: {', '.join(missing) or '#SBATCH'}")
    return "\n".join(out) + "\n"


def build_job(args, overrides, cwd=None):
    """(script text, script path, log dir, run config) for these arguments."""
    from finetune_launcher.config import parse_overrides, resolve_run_config
    from finetune_launcher.config.machine import named

    cwd = Path(cwd or os.getcwd()).resolve()
    config_path = Path(args.config)
    config_path = (config_path if config_path.is_absolute() else cwd / config_path).resolve()
    nproc = args.nproc_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    machine = named(args.gpu if args.gpu and args.gpus_per_node > 0 else "cpu")
    config = resolve_run_config(config_path, parse_overrides(overrides), procs_per_node=nproc, nnodes=args.nodes,
                                machine=machine, require_model=False)
    mode = args.mode or config.mode
    if mode != config.mode:
        raise SubmitError(f"--mode {mode} but {args.config} has mode: {config.mode}")
    out_dir = Path(config.output_dir)
    run_dir = (out_dir if out_dir.is_absolute() else cwd / out_dir) / config.run_name
    log_dir = run_dir / "slurm"
    recipe = ["--recipe", config.recipe] if recipe_table.get(config.recipe).launcher else []
    launch_args = ["--mode", mode, *recipe, *launcher_options(args), str(config_path), *overrides]
    values = {
        "FTL_ROOT": shlex.quote(str(PACKAGE_DIR.parent)),
        "FTL_PYTHON": shlex.quote(os.environ.get("FTL_PYTHON") or sys.executable),
        "FTL_NPROC_PER_NODE": str(nproc),
        "FTL_LOG_DIR": shlex.quote(str(log_dir)),
        "FTL_ARGS": "(" + " ".join(shlex.quote(a) for a in launch_args) + ")",
    }
    template = resource(TEMPLATE).read_text()
    shutdown = max(30, args.signal_secs - 60)
    template = template.replace('TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240', f'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{shutdown}')
    job_name = args.job_name or config.run_name
    script = render(template, sbatch_options(args, job_name, log_dir, cwd), values)
    return script, log_dir / "job.sbatch", log_dir, config


def launcher_options(args):
    """The submit flags that finetune_launcher.launch takes on every node."""
    options = ["--launcher", args.launcher] if args.launcher else []
    return options + [flag for flag, on in (("--force", args.force), ("--no-preflight", args.no_preflight)) if on]


def preflight_at_submit(args, config):
    """The launchers' memory and time estimate, for the nodes' GPU type, before anything queues; printed on stderr
    (stdout carries the job id, or the script of a dry run). Returns an exit code for a refused run, else None."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        return _preflight_at_submit(args, config)


def _preflight_at_submit(args, config):
    from finetune_launcher.console import ascii_safe
    from finetune_launcher.launch.preflight import preflight

    if args.no_preflight:
        return None
    if not args.gpu or args.gpus_per_node == 0:
        print("pre-flight: pass --gpu TYPE (e.g. H100-80GB) to check memory and time before the job queues; the job "
              "checks on its nodes when it starts")
        return None
    verdict = preflight(config, gpu=args.gpu)
    if verdict is None:
        return None
    if not verdict.fits and not args.force:
        print(ascii_safe(f"error: {verdict.refusal} (nothing was submitted)"))
        return exit_codes.WONT_FIT
    print(ascii_safe(time_limit_note(verdict.total_time_h, args.time, args.signal_secs)))
    return None


def time_limit_note(total_h, time_limit, signal_secs):
    limit = time_limit_seconds(time_limit)
    if total_h is None:
        return (f"pre-flight: no total time (the dataset's size is not known here; --max_steps N gives one); at "
                f"--time {time_limit} the job checkpoints and requeues itself as often as it needs")
    if limit is None:
        return f"pre-flight: the predicted {total_h:.1f} h run under --time {time_limit}"
    usable_h = (limit - signal_secs) / 3600
    runs = max(1, -int(-total_h // usable_h))
    if runs == 1:
        return f"pre-flight: the predicted {total_h:.1f} h fit in one job of --time {time_limit}"
    return (f"pre-flight: the predicted {total_h:.1f} h need {runs} runs of --time {time_limit}: the job checkpoints "
            f"and requeues itself {runs - 1} time(s) (each waits in the queue again)")


def submit(argv):
    from finetune_launcher.config import ConfigError
    from finetune_launcher.estimate import EstimateError
    from finetune_launcher.resources import MissingResource

    try:
        args, overrides = parse_args(argv)
        script, script_path, log_dir, config = build_job(args, overrides)
        refused = preflight_at_submit(args, config)
    except (SubmitError, ConfigError, EstimateError, MissingResource) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USER_ERROR
    if refused is not None:
        return refused
    if args.dry_run:
        print(script, end="")
        print(f"# would write {script_path} and run: sbatch --parsable {script_path}")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        print("error: sbatch is not on PATH (run this on a Slurm login node)", file=sys.stderr)
        return exit_codes.USER_ERROR
    if proc.returncode != 0:
        print(f"error: sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {args.nodes} node(s), script {script_path}")
    print(f"  logs: {log_dir}/job-{job_id}.out and {log_dir}/*-{job_id}-node*.log")
    print(f"  outputs: {script_path.parent.parent}")
    print(job_id)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--head-address"]:
        return print_head_address()
    return submit(argv)


if __name__ == "__main__":
    sys.exit(main())
