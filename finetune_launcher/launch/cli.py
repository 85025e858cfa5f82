"""The launcher behind launch/train_*.sh. Before any training process starts it resolves the run config once (YAML,
overrides, schema, DeepSpeed file, derived choices), checks the model, the dataset and the checkpoint to resume, and
runs the pre-flight estimate; any problem is one message and exit 2 (4 for a run that will not fit). Then it starts
the ranks, each reading the resolved config: forked from this process on one CPU node
(finetune_launcher.launch.forked), or with torchrun, accelerate or DeepSpeed's runner; it exits with the trainer's
own code. SIGTERM or SIGUSR1 sent to it reach the training ranks (see finetune_launcher.launch.signals).

usage: ftl train [--mode lora|qlora|full] [--recipe NAME] [CONFIG.yaml] [launcher options] [--key value ...]
       (the same: python -m finetune_launcher.launch ..., bash launch/train_<mode>.sh [CONFIG.yaml] ...)
launcher options:
  --launcher fork|torchrun|accelerate|deepspeed   how processes are started (default: fork on one node without
                         GPUs, ranks forked from the launcher after its imports, with torchrun's environment;
                         torchrun on GPUs and on several nodes)
  --nproc-per-node N     processes per node (default: GPU count; 2 on a CPU machine)
  --nnodes N --node-rank R --master-addr HOST --master-port P   multi-node (Slurm sets these for you)
  --rdzv-endpoint HOST:PORT --rdzv-id ID                         torchrun c10d rendezvous (multi-node)
  --force                launch even when the pre-flight estimate says the run will not fit
  --no-preflight         skip the estimate
  --dry-run              check everything, print the command and exit
Anything else is a run-config override (--lora_r 8, --zero 3, --offload, --max_steps 100, ...).
"""
import json
import shlex
import sys
from pathlib import Path

from finetune_launcher import exit_codes, recipe_table
from finetune_launcher.console import ascii_safe, make_console_safe
from finetune_launcher.launch import LaunchError

LAUNCHERS = ("fork", "torchrun", "accelerate", "deepspeed")
MODES = recipe_table.MODES
VALUE_OPTIONS = ("--mode", "--recipe", "--launcher", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                 "--master-port", "--rdzv-endpoint", "--rdzv-id")
FLAG_OPTIONS = ("--force", "--no-preflight", "--dry-run")


def parse_launch_args(argv):
    """(launcher options, config path, run-config overrides)."""
    from finetune_launcher.config import split_command_line
    from finetune_launcher.launch.forked import fork_unavailable
    from finetune_launcher.resources import resource

    config_path, options, overrides = split_command_line(argv, VALUE_OPTIONS, FLAG_OPTIONS)
    launcher = options.get("--launcher")
    if launcher is not None and launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{launcher}'")
    why_not_fork = fork_unavailable(options)
    if launcher == "fork" and why_not_fork:
        raise LaunchError(f"--launcher fork starts the ranks of one node; {why_not_fork}: use --launcher torchrun")
    mode = options.get("--mode")
    if mode is not None and mode not in MODES:
        raise LaunchError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    recipe = launcher_recipe(options)
    if config_path is None:
        config_path = str(resource(embedded_default(recipe, mode)))
    return options, config_path, overrides


def launcher_recipe(options):
    """The recipe `--recipe` names (a recipe's own shell launcher passes it), else the default one."""
    try:
        return recipe_table.get(options.get("--recipe") or recipe_table.DEFAULT)
    except recipe_table.UnknownRecipe as error:
        raise LaunchError(f"--recipe: {error}") from None


def embedded_default(recipe, mode):
    """The embedded default config of `recipe` for `mode` (a recipe with its own launcher defaults to lora)."""
    if mode is None and recipe.launcher is None:
        raise LaunchError("give a run config (CONFIG.yaml) or --mode lora|qlora|full for the embedded default")
    mode = mode or "lora"
    if mode not in recipe.embedded:
        raise LaunchError(f"the {recipe.name} recipe has no embedded default for --mode {mode} (it has: "
                          f"{', '.join(recipe.embedded)}); give a run config")
    return recipe.embedded[mode]


def resolve_for_launch(options, config_path, overrides):
    """The RunConfig of this launch (resolved once here; every rank reads it)."""
    from finetune_launcher.config import resolve_run_config

    procs = int(options["--nproc-per-node"]) if "--nproc-per-node" in options else None
    cfg = resolve_run_config(config_path, overrides, procs_per_node=procs, nnodes=int(options.get("--nnodes", "1")))
    recipe = recipe_table.get(cfg.recipe)
    named = options.get("--recipe")
    if (named and named != cfg.recipe) or (not named and recipe.launcher):
        raise LaunchError(f"{config_path} trains the {cfg.recipe} recipe ({cfg.model}); start it with "
                          f"launch/{recipe.launcher_for(cfg.mode)}")
    if options.get("--mode") and cfg.mode != options["--mode"]:
        fix = "pass --mode with the config's mode" if recipe.launcher else f"use launch/train_{cfg.mode}.sh"
        raise LaunchError(f"{config_path} has mode: {cfg.mode}, but this is the {options['--mode']} launcher; {fix} "
                          f"or change mode")
    return cfg


def main(argv=None):
    make_console_safe()
    from finetune_launcher.launch.forked import compute_single_threaded

    compute_single_threaded()
    from finetune_launcher.errors import UserError
    from finetune_launcher.launch.signals import ignore_stop_signals, in_slurm_step
    from finetune_launcher.resources import MissingResource

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return exit_codes.OK
    if in_slurm_step():
        ignore_stop_signals()  # from the start: a USR1 during the checks must not kill this task of the step
    try:
        options, config_path, overrides = parse_launch_args(argv)
        cfg = resolve_for_launch(options, config_path, overrides)
        options.setdefault("--launcher", default_launcher(cfg, options))
        report_decisions(cfg)
        from finetune_launcher.launch.prechecks import check_before_launch

        prepared = check_before_launch(cfg)
        refused, verdict = run_preflight(cfg, options)
    except (LaunchError, UserError, MissingResource) as error:
        print(ascii_safe(f"error: {error}"), file=sys.stderr)
        return exit_codes.USER_ERROR
    if refused:
        return refused
    try:
        return start_ranks(cfg, options, prepared, verdict)
    except LaunchError as error:
        print(ascii_safe(f"error: {error}"), file=sys.stderr)
        return exit_codes.USER_ERROR


def default_launcher(cfg, options):
    """fork on one node without GPUs; torchrun otherwise. On a GPU machine the ranks' imports (peft, bitsandbytes,
    Liger) start CUDA, and a rank forked after that could not use it (seen on an H200: docs/benchmarks.md)."""
    from finetune_launcher.launch.forked import fork_unavailable

    return "fork" if cfg.device_kind == "cpu" and not fork_unavailable(options) else "torchrun"


def report_decisions(cfg):
    from finetune_launcher.console import say, warn

    for note in cfg.decisions.get("deepspeed", [])[1:]:
        (warn if note.startswith("WARNING") else say)(f"deepspeed: {note.removeprefix('WARNING: ')}")
    say(f"run config: {cfg.recipe}, {cfg.mode}, ZeRO-{cfg.zero_stage}{' + offload' if cfg.offload else ''}, "
        f"{cfg.precision} ({cfg.decisions['precision']}), {cfg.world_size} process(es)")
    say(f"gradient checkpointing: {cfg.decisions['gradient_checkpointing']}")
    say(f"liger kernels: {cfg.decisions['liger_kernel']}")
    say(f"engine: {cfg.engine} ({cfg.decisions['engine']})")
    say(f"compile layers: {cfg.decisions['compile_layers']}")
    if "experts" in cfg.decisions:
        say(f"experts: {cfg.decisions['experts']}")


def run_preflight(cfg, options):
    """(the exit code that refuses the run or None to go on, the estimate or None)."""
    if options.get("--no-preflight"):
        return None, None
    from finetune_launcher.launch.preflight import host_memory_refusal, preflight

    verdict = preflight(cfg)
    if verdict is None or options.get("--force"):
        return None, verdict
    refusal = verdict.refusal or host_memory_refusal(verdict)
    if refusal:
        print(ascii_safe(f"error: {refusal}"), file=sys.stderr)
        return exit_codes.WONT_FIT, verdict
    return None, verdict


def start_ranks(cfg, options, prepared, verdict=None):
    """Start the ranks on the resolved config and the data prepared in `prepared` (a directory); return the
    trainer's exit code."""
    from finetune_launcher.data.prepared import PREPARED_ENV
    from finetune_launcher.estimate.trainer_log import LAUNCH_ESTIMATE_ENV, estimate_figures
    from finetune_launcher.launch.commands import launch_env
    from finetune_launcher.launch.scratch import launch_scratch_dir

    with launch_scratch_dir() as scratch:
        resolved = Path(scratch) / "run_config.json"
        resolved.write_text(cfg.to_json())
        env = launch_env(cfg.procs_per_node)
        env[PREPARED_ENV] = str(Path(prepared).resolve())
        if verdict is not None:  # rank 0 logs and records the pre-flight's figures instead of estimating again
            figures = Path(scratch) / "estimate.json"
            figures.write_text(json.dumps(estimate_figures(verdict, cfg.nnodes)))
            env[LAUNCH_ESTIMATE_ENV] = str(figures)
        code_file = Path(scratch) / "exit_code"
        if options["--launcher"] == "fork" and fork_ranks_here(cfg, options):
            return fork_ranks(cfg, options, resolved, env, code_file)
        return exec_launcher(cfg, options, resolved, env, code_file)


def fork_ranks_here(cfg, options):
    """Whether the ranks can be forked from this process once it has imported what they need; else torchrun."""
    from finetune_launcher.console import warn
    from finetune_launcher.launch.forked import cuda_started, import_rank_modules

    culprit = None if options.get("--dry-run") else import_rank_modules(cfg)
    if culprit or cuda_started():
        warn(f"CUDA started in the launcher ({f'importing {culprit}' if culprit else 'before the ranks'}), and a "
             f"forked rank could not use it: starting the ranks with torchrun")
        options["--launcher"] = "torchrun"
        return False
    return True


def fork_ranks(cfg, options, resolved, env, code_file):
    from finetune_launcher.distributed import free_port
    from finetune_launcher.launch.forked import rank_environments
    from finetune_launcher.launch.signals import fork_and_report

    print(ascii_safe(f"+ fork {cfg.procs_per_node} rank(s) of: {shlex.quote(sys.executable)} -m finetune_launcher "
                     f"--resolved {resolved}  (torchrun's environment, master port chosen here)"), flush=True)
    if options.get("--dry-run"):
        return exit_codes.OK
    envs = rank_environments(env, cfg.procs_per_node, options.get("--master-port") or free_port())
    return fork_and_report(resolved, envs, code_file)


def exec_launcher(cfg, options, resolved, env, code_file):
    from finetune_launcher.launch.commands import build_command
    from finetune_launcher.launch.signals import run_and_report

    cmd = build_command(options, cfg, resolved)
    print(ascii_safe("+ " + " ".join(shlex.quote(c) for c in cmd)), flush=True)
    if options.get("--dry-run"):
        return exit_codes.OK
    return run_and_report(cmd, env, code_file)


if __name__ == "__main__":
    sys.exit(main())
