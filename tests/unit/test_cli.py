"""`ftl` (finetune_launcher/cli.py): one installed command whose subcommands are the user's tools; each subcommand's
--help is useful and ASCII, a recipe's own command comes from the recipe table, and a mistyped command is one
`error:` line."""
import pytest

from finetune_launcher import cli, recipe_table

USER_COMMANDS = ("train", "estimate", "evaluate", "generate", "merge", "plot", "submit", "keys", "generate-images")


def run_ftl(capsys, *argv):
    """ftl ARGV in this process: (exit code, stdout, stderr); argparse's own exits (--help) included."""
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_user_command(capsys):
    code, out, _ = run_ftl(capsys, "--help")
    assert code == 0
    for name in USER_COMMANDS:
        assert f"\n  {name} " in out, out
    out.encode("ascii")


@pytest.mark.parametrize("command", USER_COMMANDS)
def test_each_command_has_an_ascii_help_naming_its_options(capsys, command):
    code, out, err = run_ftl(capsys, command, "--help")
    assert code == 0, err
    assert "usage:" in out and "--" in out and f"ftl {command}" in out, out[:600]
    out.encode("ascii")
    assert run_ftl(capsys, "help", command)[1] == out


def test_an_unknown_command_is_one_error_line(capsys):
    code, out, err = run_ftl(capsys, "evalute", "--adapter", "x")
    assert code == 2 and not out
    assert err.startswith("error: unknown command 'evalute'") and "evaluate" in err and len(err.splitlines()) == 1


def test_no_command_prints_the_usage_and_fails(capsys):
    code, out, _ = run_ftl(capsys)
    assert code == 2 and "usage: ftl COMMAND" in out


def test_a_recipe_adds_its_own_command_through_the_table(capsys, monkeypatch, tmp_path):
    """A recipe registered from outside (as FTL_RECIPES modules do) whose modules name a command gets it in ftl."""
    module = tmp_path / "toy_recipe_command.py"
    module.write_text("NAME = 'toy-report'\nSUMMARY = 'the toy recipe says hello'\n"
                      "def main(argv):\n    print('hello', *argv)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(recipe_table.RECIPES, "toy", recipe_table.Recipe(
        name="toy", package="toy_recipe", summary="a toy", modules={"command": "command"}))
    monkeypatch.setattr(recipe_table, "part", lambda recipe, role: __import__("toy_recipe_command")
                        if getattr(recipe, "name", recipe) == "toy" and role == "command" else REAL_PART(recipe, role))
    assert "  toy-report       the toy recipe says hello" in run_ftl(capsys, "--help")[1]
    assert run_ftl(capsys, "toy-report", "a", "b")[:2] == (0, "hello a b\n")


REAL_PART = recipe_table.part


def test_a_tool_error_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run_ftl(capsys, "generate", "text", "--adapter", str(tmp_path / "no_run" / "best"), "--prompt", "hi")
    assert code == 2 and err.strip().startswith("error: adapter directory not found") and "Traceback" not in err


def test_keys_lists_each_declared_key_with_its_default_and_the_schema_validates_a_config(capsys):
    import json

    import jsonschema

    code, out, _ = run_ftl(capsys, "keys")
    assert code == 0 and "lora_r" in out and "LoRA rank [identity]" in out
    assert "diffusion keys" in out and "resolution" in out.split("diffusion keys", 1)[1]
    code, out, _ = run_ftl(capsys, "keys", "--schema")
    schema = json.loads(out)
    jsonschema.validate({"mode": "lora", "model": "m", "dataset": "d", "resolution": 256}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"mode": "lora", "model": "m", "dataset": "d", "lora_rank": 8}, schema)
