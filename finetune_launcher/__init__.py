"""finetune-launcher: launchers and shared training parts for causal-LM fine-tunes (full, LoRA, QLoRA) under
DeepSpeed ZeRO-2/3. `python -m finetune_launcher --config X` runs a recipe on each rank; launch/train_*.sh start the
ranks."""
__version__ = "0.2.0"
