"""ftl generate-images: generate images with a diffusion run's weights (best/ or final/) on its base pipeline, write
them as PNGs; compare with the base side by side; or fuse the weights into a standalone pipeline directory.

    ftl generate-images --adapter outputs/tiny_sd_lora/best --prompt "a red circle" --seed 0 --seed 1
    ftl generate-images --adapter outputs/tiny_sd_lora/best --prompt "a red circle" --seed 0 --compare
    ftl generate-images --adapter outputs/tiny_sd_lora/best --fuse outputs/tiny_sd_lora/fused
    ftl generate-images --base outputs/tiny_sd_lora/fused --prompt "a red circle" --seed 0

The base pipeline is the run's (training_info.json's base_model) unless --base is given; without --adapter, --base
alone is generated from (a base, or a pipeline written by --fuse). A LoRA is applied with diffusers' own
StableDiffusionPipeline.load_lora_weights (a full fine-tune's unet/ replaces the base's UNet). Each image's noise
comes from a CPU generator seeded by --seed, so a seed gives the same picture on any device and for base and tuned
alike. Images go to --out (default: generated/ in the run directory), one file per prompt and seed; with --compare
each file holds the base's image (left) beside the tuned one (right). --fuse writes a complete pipeline (loadable
with StableDiffusionPipeline.from_pretrained, no adapter needed), checked to draw what base + weights draw for a
fixed prompt and seed before the directory appears. A QLoRA run's LoRA goes on the UNet it was trained against
(the base's linear weights quantized to NF4 as in training, then de-quantized; needs bitsandbytes), and so do the
base's images of --compare; --qlora-base original uses the stored UNet instead.
"""
import argparse
import sys
from pathlib import Path

from finetune_launcher.after.bases import pick_device
from finetune_launcher.after.run_files import AdapterError
from finetune_launcher.console import ascii_safe
from finetune_launcher.recipes.diffusion.after import (apply_weights, check_pipeline, default_resolution,
                                                       dequantize_unet, diffusion_weights, fuse_weights, generate,
                                                       image_name, load_pipeline, pipeline_dtype, side_by_side,
                                                       uses_dequantized_unet)

NAME = "generate-images"  # the `ftl` command (the recipe table lists this module as the recipe's "command")
SUMMARY = "diffusion runs: PNGs per prompt and seed, --compare with the base, --fuse into a pipeline"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=f"ftl {NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a diffusion run's best/ or final/ directory")
    parser.add_argument("--base", help="base pipeline (builtin:tiny-sd, hub id or directory); default: the run's")
    parser.add_argument("--prompt", dest="prompts", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--seed", dest="seeds", action="append", type=int, default=[],
                        help="a seed (repeatable: one image per prompt and seed; default 0)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--resolution", type=int, default=0, help="image side in pixels (default: the run's)")
    parser.add_argument("--compare", action="store_true", help="write base (left) and tuned (right) side by side")
    parser.add_argument("--out", help="directory for the PNGs (default: generated/ beside --adapter)")
    parser.add_argument("--fuse", metavar="OUT_DIR", help="write a standalone pipeline with the weights fused in")
    parser.add_argument("--overwrite", action="store_true", help="with --fuse: replace an earlier fused pipeline")
    parser.add_argument("--qlora-base", choices=("dequantized", "original"), default="dequantized",
                        help="a QLoRA run's LoRA goes on the de-quantized NF4 UNet it was trained against (default) "
                             "or on the stored UNet")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bf16/fp16 on GPU")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1")
    return parser.parse_args(argv)


def say(message):
    print(ascii_safe(message), flush=True)


def check_args(args):
    """Fail on a wrong combination before the slow imports."""
    if not args.adapter and not args.base:
        raise AdapterError("pass --adapter DIR (a diffusion run's best/ or final/) or --base PIPELINE")
    if args.fuse and not args.adapter:
        raise AdapterError("--fuse needs --adapter: the run's weights to fuse into the base")
    if args.compare and not args.adapter:
        raise AdapterError("--compare needs --adapter: it shows the base beside the tuned pipeline")
    if not args.fuse and not args.prompts:
        raise AdapterError("pass --prompt TEXT (repeatable)")
    if args.steps < 1:
        raise AdapterError(f"--steps {args.steps}: at least 1")


def out_dir(args):
    if args.out:
        return Path(args.out)
    return Path(args.adapter).resolve().parent / "generated" if args.adapter else Path("generated")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_args(args)
    weights = diffusion_weights(args.adapter, args.base) if args.adapter else None
    base_path = weights.base_path if weights else check_pipeline(args.base, "given with --base")
    if args.fuse:
        fuse_weights(weights, args.fuse, args.overwrite, log=say, qlora_base=args.qlora_base)
        say(f"wrote a fused pipeline to {args.fuse}; use it: ftl generate-images --base {args.fuse} "
            f"--prompt \"...\"")
        if not args.prompts:
            return 0
    written = generate_all(args, weights, base_path)
    say(f"wrote {len(written)} image(s) to {out_dir(args)}")
    return 0


def generate_all(args, weights, base_path):
    """Base images first (for --compare), then the weights go on the same pipeline for the tuned ones."""
    device = pick_device(args.device)
    pipeline = load_pipeline(base_path, pipeline_dtype(args.dtype, device), device)
    if uses_dequantized_unet(weights, args.qlora_base):
        dequantize_unet(pipeline)
        say("QLoRA run: its LoRA goes on the de-quantized UNet it was trained against (the base's linear weights "
            "quantized to NF4 as in training, then de-quantized; --qlora-base original: the stored UNet)")
    resolution = args.resolution or default_resolution(weights.info if weights else {}, pipeline)
    jobs = [(i, prompt, seed) for i, prompt in enumerate(args.prompts) for seed in (args.seeds or [0])]

    def draw(prompt, seed):
        return generate(pipeline, prompt, seed, resolution, args.steps, args.guidance_scale)

    base_images = {(i, seed): draw(prompt, seed) for i, prompt, seed in jobs} if args.compare else {}
    if weights:
        apply_weights(pipeline, weights)
        say(f"{'LoRA' if weights.kind == 'lora' else 'fine-tuned UNet'} {weights.directory} on base "
            f"{weights.base_reference}; {resolution}x{resolution}, {args.steps} steps, guidance {args.guidance_scale}")
    target = out_dir(args)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt, seed in jobs:
        image = draw(prompt, seed)
        if args.compare:
            image = side_by_side(base_images[(i, seed)], image)
        path = target / image_name(i, prompt, seed, "-compare" if args.compare else "")
        image.save(path)
        say(f"{path}  ({'base | tuned: ' if args.compare else ''}{prompt!r}, seed {seed})")
        written.append(path)
    return written

