"""python tools/generate.py ARGS runs `ftl generate ARGS` (finetune_launcher/cli.py): the same command for a checkout
whose environment has not installed `ftl`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune_launcher.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
