"""Which imports start CUDA (a benchmark probe, GPU machines only): each module imported alone in a fresh
interpreter, then torch.cuda.is_initialized(). A rank cannot be forked from a launcher in which CUDA has started
(finetune_launcher/launch/forked.py); docs/benchmarks.md has what an H200 showed.

    python bench/cuda_at_import.py [MODULE ...]
"""
import subprocess
import sys

MODULES = ["torch", "deepspeed", "deepspeed.ops.op_builder.all_ops", "deepspeed.runtime.zero.muon.muon_optimizer",
           "peft", "torch.utils.tensorboard", "matplotlib.pyplot", "transformers", "liger_kernel.transformers",
           "triton", "bitsandbytes", "diffusers", "finetune_launcher.rank",
           "finetune_launcher.recipes.causal_lm.recipe", "finetune_launcher.recipes.vision_language.recipe",
           "finetune_launcher.recipes.diffusion.recipe", "finetune_launcher.recipes.vision_language.model",
           "finetune_launcher.recipes.diffusion.model", "finetune_launcher.engines", "finetune_launcher.loop"]


def main(modules):
    for name in modules:
        code = f"import importlib, torch; importlib.import_module({name!r}); print(torch.cuda.is_initialized())"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        answer = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else ["import failed"]
        print(name, answer, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or MODULES)
