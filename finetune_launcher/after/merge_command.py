"""Merge a LoRA or QLoRA adapter into its base and save a standalone model (sharded safetensors + tokenizer; for a
vision-language run + processor, loadable with AutoModelForImageTextToText).

    ftl merge --adapter outputs/tiny_lora/best --out outputs/tiny_lora/merged
    ftl merge --adapter outputs/tiny_vl_lora/best --out outputs/tiny_vl_lora/merged

The base is read from the adapter (training_info.json, else adapter_config.json) unless --base is given. A QLoRA
adapter is merged into the de-quantized base, the weights it was trained against: the base loaded in 4-bit NF4 as
training loads it (bitsandbytes, on the CPU), then de-quantized; --qlora-base original merges it into the stored
full-precision base instead. The saved model is reloaded and its logits are checked against base + adapter before
the output directory appears (a vision-language model: on a picture with a question and answer, and a text row).
Diffusion runs are fused into a pipeline by `ftl generate-images --fuse`.
"""
import argparse
import sys

from finetune_launcher.after.bases import QLORA_BASES
from finetune_launcher.after.loading import DTYPES
from finetune_launcher.after.merge import merge_adapter
from finetune_launcher.after.parts import after_part


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ftl merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter directory (a run's best/ or final/)")
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    parser.add_argument("--base", help="base model (builtin:NAME, hub id or directory); default: the adapter's")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype to merge and save in; auto = the base checkpoint's dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier merge")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    parser.add_argument("--qlora-base", choices=QLORA_BASES, default="dequantized",
                        help="for a QLoRA adapter: merge into the de-quantized 4-bit base it was trained against "
                             "(default; needs bitsandbytes) or into the original full-precision base")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = merge_adapter(args.adapter, args.out, args.base, args.dtype, args.max_shard_size, args.overwrite,
                           args.device, args.trust_remote_code, qlora_base=args.qlora_base)
    part = after_part(result.recipe)
    print(f"saved {len(result.files)} safetensors shard(s) + {part.PREPROCESSOR} to {result.out_dir}: "
          f"{', '.join(result.files)}")
    print(f"check: merged vs base + adapter logits ({part.MERGE_CHECK}), max abs diff {result.max_abs_diff:.3g} "
          f"(tolerance {result.tolerance:.3g}) OK")
    print(f"use it: ftl generate text --model {result.out_dir}{' --image PICTURE' if part.TAKES_IMAGES else ''} "
          f"--prompt \"...\"")
    return 0
