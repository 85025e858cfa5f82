"""The commands that start the ranks: torchrun (default), `accelerate launch` with an accelerate config generated
from the run config, or DeepSpeed's own runner with a hostfile. Each runs the same trainer (`python -m finetune_launcher
--resolved FILE`: the run config resolved once by the launcher); what they generate goes to outputs/<run>/launch/.

The trainer initialises the process group itself (gloo on CPU, NCCL on GPUs) from RANK / WORLD_SIZE / MASTER_ADDR,
which every launcher sets; the accelerate config only tells `accelerate launch` how many processes to start and
where the (resolved) DeepSpeed file is.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from finetune_launcher.distributed import free_port
from finetune_launcher.launch import LaunchError
from finetune_launcher.resources import PACKAGE_DIR


def launch_env(nproc):
    from finetune_launcher.launch.forked import RANK_THREADS_ENV

    env = dict(os.environ)
    if RANK_THREADS_ENV in env:  # the launcher runs on one thread; the ranks get what the caller set
        env["OMP_NUM_THREADS"] = env.pop(RANK_THREADS_ENV)
        if not env["OMP_NUM_THREADS"]:
            del env["OMP_NUM_THREADS"]
    env["PYTHONPATH"] = str(PACKAGE_DIR.parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if (PACKAGE_DIR.parent / "ds_configs").is_dir():  # a checkout: compiled DeepSpeed ops cached beside it
        env.setdefault("TORCH_EXTENSIONS_DIR", str(PACKAGE_DIR.parent / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, nproc))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Never NVLink multicast (NVLS): it hangs or is refused on shared hosts.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # torchrun (also under accelerate) passes USR1 on to its workers instead of dying of it and leaving them
    # running, when it is signalled itself (the whole process group, or Slurm).
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    return env


def trainer_module_args(resolved):
    return ["--module", "finetune_launcher", "--resolved", str(resolved)]


def build_command(options, cfg, resolved):
    launcher = options["--launcher"]
    if launcher == "torchrun":
        return torchrun_command(sys.executable, cfg.procs_per_node, options, resolved)
    if launcher == "accelerate":
        return accelerate_command(sys.executable, cfg, options, resolved)
    return deepspeed_command(sys.executable, cfg, options, resolved)


def torchrun_command(python, nproc, options, resolved):
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if "--rdzv-endpoint" in options:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", options["--rdzv-endpoint"], "--rdzv_id", options.get("--rdzv-id", "ftl")]
    else:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--node_rank", options.get("--node-rank", "0"),
                "--master_addr", options.get("--master-addr", "127.0.0.1"),
                "--master_port", options.get("--master-port", str(free_port()))]
    return cmd + ["-m", "finetune_launcher", "--resolved", str(resolved)]


def launcher_dir(run_dir):
    path = Path(run_dir) / "launch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def node_rank(options):
    return int(options.get("--node-rank", os.environ.get("SLURM_NODEID", "0")))


def node_layout(options):
    """(nnodes, node_rank, master_addr, master_port) from the launcher options; a c10d endpoint gives addr:port."""
    nnodes = int(options.get("--nnodes", "1"))
    rank = node_rank(options)
    if "--rdzv-endpoint" in options:
        host, _, port = options["--rdzv-endpoint"].rpartition(":")
        return nnodes, rank, host, int(port)
    addr = options.get("--master-addr", "127.0.0.1")
    port = int(options.get("--master-port") or free_port())
    return nnodes, rank, addr, port


# ---------------------------------------------------------------- accelerate

def accelerate_config(cfg, options, deepspeed_file):
    """The accelerate config dict: DeepSpeed plugin pointing at the run's resolved DeepSpeed file, one process per
    GPU (or CPU slot), never `use_cpu` (accelerate would then start a single process)."""
    nnodes, rank, addr, port = node_layout(options)
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": str(Path(deepspeed_file).resolve()),
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": cfg.zero_stage == 3,
        },
        "num_machines": nnodes,
        "num_processes": cfg.procs_per_node * nnodes,
        "machine_rank": rank,
        "main_process_ip": addr,
        "main_process_port": port,
        "main_training_function": "main",
        "mixed_precision": cfg.precision if cfg.precision in ("bf16", "fp16") else "no",
        "rdzv_backend": "c10d" if "--rdzv-endpoint" in options else "static",
        "same_network": True,
        "use_cpu": False,
        "debug": False,
        "downcast_bf16": "no",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }


def accelerate_command(python, cfg, options, resolved):
    nnodes, rank = int(options.get("--nnodes", "1")), node_rank(options)
    # One file per node: the nodes of a multi-node run share the run directory but differ in machine_rank.
    suffix = f"_node{rank}" if nnodes > 1 else ""
    folder = launcher_dir(cfg.run_dir)
    deepspeed_file = folder / f"deepspeed{suffix}.json"
    deepspeed_file.write_text(json.dumps(cfg.deepspeed_dict(), indent=2))
    path = folder / f"accelerate_config{suffix}.yaml"
    path.write_text("# generated by finetune-launcher from the run config; see finetune_launcher/launch/commands.py\n"
                    + yaml.safe_dump(accelerate_config(cfg, options, deepspeed_file), sort_keys=False))
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(path), *trainer_module_args(resolved)]


# ---------------------------------------------------------------- DeepSpeed's runner

def slurm_hostnames():
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def hostfile_lines(nproc, nnodes):
    """One `host slots=N` line per node: localhost alone, or the Slurm allocation's nodes."""
    if nnodes <= 1:
        return [f"localhost slots={nproc}"]
    hosts = slurm_hostnames()
    if len(hosts) != nnodes:
        hosts = os.environ.get("FTL_HOSTS", "").replace(",", " ").split()
    if len(hosts) != nnodes:
        raise LaunchError(f"--launcher deepspeed with --nnodes {nnodes} needs the node names: run inside a Slurm "
                          f"allocation of {nnodes} nodes or set FTL_HOSTS=host1,host2,...")
    return [f"{host} slots={nproc}" for host in hosts]


def deepspeed_command(python, cfg, options, resolved):
    """DeepSpeed's own launcher. One node: the local launcher, no ssh. Several: each node runs this command with
    its --node-rank (`--no_ssh`, like torchrun under srun); the hostfile lists every node."""
    nnodes, rank, addr, port = node_layout(options)
    hostfile = launcher_dir(cfg.run_dir) / "hostfile"
    hostfile.write_text("\n".join(hostfile_lines(cfg.procs_per_node, nnodes)) + "\n")
    cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
           "--master_addr", addr, "--master_port", str(port)]
    cmd += ["--no_ssh", "--node_rank", str(rank)] if nnodes > 1 else ["--no_ssh_check"]
    # --no_local_rank: the trainer reads LOCAL_RANK from the environment; a --local_rank argument would be taken
    # for an (unknown) run-config key.
    return cmd + ["--no_local_rank", *trainer_module_args(resolved)]
