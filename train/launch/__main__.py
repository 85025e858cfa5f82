"""python -m train.launch: see train/launch/cli.py."""
from train.exit_codes import exit_without_teardown
from train.launch.cli import main

exit_without_teardown(main())
