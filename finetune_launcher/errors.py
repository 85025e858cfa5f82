"""The errors a user can fix, one family: every entry point prints them as one `error: ...` line and exits 2
(finetune_launcher/exit_codes.py), before launch when it can. Each message names the file, key or line and the fix."""


class UserError(ValueError):
    """A problem with what the user gave (config, data, model name, command line); the message says the fix."""


class ConfigError(UserError):
    """A run-config problem; the message names the file and key."""


class DataError(UserError):
    """A data problem; the message names the file, line and fields."""
