"""Per-GPU memory, step time and total time of a fine-tune before it is launched (finetune_launcher/estimate/cli.py;
`python tools/estimate_time.py --help`)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune_launcher.estimate.cli import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head` stopped reading: nothing left to say (Python's documented idiom)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
