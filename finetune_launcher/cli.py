"""finetune-launcher (also installed as `ftl`): every user command of the project as one installed command.

    ftl train --mode lora                         # train the embedded default (2 processes on a CPU machine)
    ftl train configs/my_run.yaml --zero 3 --max_steps 100
    ftl estimate --config configs/my_run.yaml --gpu H100-80GB --gpus-per-node 8
    ftl evaluate --adapter outputs/tiny_lora/best --adapter outputs/tiny_lora/final --data held_out.jsonl
    ftl generate text --adapter outputs/tiny_lora/best --prompt "What color is the fox?"
    ftl merge --adapter outputs/tiny_lora/best --out outputs/tiny_lora/merged
    ftl plot outputs/tiny_lora
    ftl submit --config configs/my_run.yaml --nodes 2 --gpus-per-node 8 --time 04:00:00 --dry-run

`ftl COMMAND --help` (or `ftl help COMMAND`) gives each command's options. In a checkout, launch/*.sh and tools/*.py
run the same code."""
import importlib
import sys

from finetune_launcher import __version__, exit_codes, recipe_table
from finetune_launcher.after.cli import tool_exit_code
from finetune_launcher.console import ascii_safe, make_console_safe

PROG = "ftl"
# name: (summary, "module:function" taking argv and returning the exit code); recipes add theirs (recipe_table:
# modules["command"]).
COMMANDS = {
    "train": ("train: resolve and check the run config, estimate, start the ranks (as launch/train_*.sh)",
              "finetune_launcher.launch.cli:main"),
    "estimate": ("per-GPU memory, step time and total time of a run before it is launched",
                 "finetune_launcher.estimate.cli:main"),
    "evaluate": ("eval loss and perplexity of the base, best/ and final/ side by side (+ VL answer accuracy)",
                 "finetune_launcher.after.evaluate_command:main"),
    "generate": ("text / demo / interactive generation with the run's prompt template (--image for VL runs)",
                 "finetune_launcher.after.generate_command:main"),
    "merge": ("adapter + base -> a standalone model, checked against base + adapter",
              "finetune_launcher.after.merge_command:main"),
    "plot": ("curves from training_history.json, also while the run goes on",
             "finetune_launcher.after.plot_command:main"),
    "submit": ("submit a run as a Slurm job (checked and estimated on the login node first)",
               "finetune_launcher.launch.slurm:main"),
    "keys": ("every run-config key with its default and help (--schema: the JSON schema)",
             "finetune_launcher.config.keys_command:main"),
}


def commands():
    """{name: (summary, target)}: the built-in commands, then those the recipes add."""
    found = dict(COMMANDS)
    for recipe in recipe_table.recipes():
        module = recipe_table.part(recipe, "command")
        if module is not None:
            found[module.NAME] = (module.SUMMARY, module.main)
    return found


def usage():
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<16} {summary}" for name, (summary, _) in commands().items()]
    lines += ["  help COMMAND     the options of COMMAND", "", __doc__.split("\n\n", 1)[1]]
    return "\n".join(lines)


def target_function(target):
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None):
    """Run `ftl COMMAND ...`; returns the command's exit code."""
    make_console_safe()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and argv[1:]:
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return exit_codes.OK if argv else exit_codes.USER_ERROR
    if argv[0] == "--version":
        print(f"finetune-launcher {__version__}")
        return exit_codes.OK
    known = commands()
    if argv[0] not in known:
        print(ascii_safe(f"error: unknown command '{argv[0]}'; the commands are {', '.join(known)} "
                         f"({PROG} --help)"), file=sys.stderr)
        return exit_codes.USER_ERROR
    return tool_exit_code(target_function(known[argv[0]][1]), argv[1:])


def run():
    """The installed commands' entry point: main(), then exit without the interpreter's slow teardown of torch and
    DeepSpeed (the launcher's own entry point does the same)."""
    exit_codes.exit_without_teardown(main())


if __name__ == "__main__":
    run()
