"""python -m train.submit: Slurm submission (kept name; the code is train.launch.slurm)."""
import sys

from train.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
