"""ftl keys [--recipe NAME] [--schema]: every run-config key with its default and help, from the declarations
(config/settings.py and the recipe table); --schema prints the JSON schema runs are validated against (for an
editor's YAML checks)."""
import argparse
import json

from finetune_launcher import exit_codes, recipe_table
from finetune_launcher.config.settings import run_config_schema, shared_keys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ftl keys", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=recipe_table.names(), help="only the shared keys and this recipe's own")
    p.add_argument("--schema", action="store_true", help="print the run config's JSON schema instead")
    return p.parse_args(argv)


def key_lines(keys):
    lines = []
    for key in keys:
        default = json.dumps(list(key.default) if isinstance(key.default, tuple) else key.default)
        mark = " [identity]" if key.identity else ""
        lines.append(f"  {key.name:<28} {default:<14} {key.help}{mark}".rstrip())
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.schema:
        print(json.dumps(run_config_schema(), indent=2))
        return exit_codes.OK
    lines = ["shared keys (name, default, help; [identity]: a checkpoint continues only when it matches):"]
    lines += key_lines(shared_keys())
    for recipe in recipe_table.recipes():
        if recipe.keys and args.recipe in (None, recipe.name):
            lines += ["", f"{recipe.name} keys ({recipe.summary}):", *key_lines(recipe.keys)]
    print("\n".join(lines))
    return exit_codes.OK
