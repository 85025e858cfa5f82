"""finetune-launcher: one distributed trainer for full, LoRA and QLoRA fine-tunes under DeepSpeed."""
from pathlib import Path

__version__ = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
