"""python -m finetune_launcher.launch: see finetune_launcher/launch/cli.py."""
from finetune_launcher.exit_codes import exit_without_teardown
from finetune_launcher.launch.cli import main

exit_without_teardown(main())
