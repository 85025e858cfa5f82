"""python -m train.launch: see train/launch/cli.py."""
import sys

from train.launch.cli import main

sys.exit(main())
