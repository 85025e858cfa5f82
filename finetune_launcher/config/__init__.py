"""The run config: read from YAML and the command line, validated, reconciled with the DeepSpeed file and resolved
into one frozen RunConfig before any rank starts."""
from finetune_launcher.config.resolve import resolve_run_config
from finetune_launcher.config.settings import CONFIG_KEYS, RunConfig, identity_keys, replace_settings
from finetune_launcher.config.sources import (ConfigError, known_keys, normalize_report_to, parse_overrides,
                                              split_command_line)

__all__ = ["CONFIG_KEYS", "ConfigError", "RunConfig", "identity_keys", "known_keys", "normalize_report_to",
           "parse_overrides", "replace_settings", "resolve_run_config", "split_command_line"]
