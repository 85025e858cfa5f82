"""python -m finetune_launcher.submit: Slurm submission (kept name; the code is finetune_launcher.launch.slurm)."""
import sys

from finetune_launcher.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
