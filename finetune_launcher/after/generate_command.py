"""Generate text from a base model, an adapter (best/ or final/) or a merged model, with the prompt template the
model was trained with applied exactly as in training; vision-language models also take images.

    ftl generate text --adapter outputs/tiny_lora/best --prompt "What color is the fox?"
    ftl generate text --model outputs/tiny_lora/merged --prompt "Sort the numbers." --context "3 1 2"
    ftl generate demo --adapter outputs/tiny_lora/best [--prompts tools/demo_prompts.jsonl]
    ftl generate interactive --adapter outputs/tiny_lora/best
    ftl generate text --adapter outputs/tiny_vl_lora/best --image picture.png --prompt "What color is it?"

`text` prints only the generated text on stdout (notes go to stderr), so it can be used in scripts. Decoding is
greedy unless --temperature > 0. The template is the run's dataset format from training_info.json; a model without
one gets the instruction template of finetune_launcher/data/prompts.py (override with --format). A vision-language
model is prompted with its processor's chat template, as training tokenises it; --image (repeatable) goes with the
prompt (in demo and interactive mode with every prompt that names no image of its own: an "image" / "images" field
of a prompts-file line, relative to the file, or a line `/image PATH` before an interactive prompt). Without an
image it answers from the text alone.
"""
import argparse
import sys
from pathlib import Path

from finetune_launcher.after.bases import QLORA_BASES, pick_device, qlora_note
from finetune_launcher.after.loading import DTYPES, AdapterError, check_adapter_dir, load_adapter, load_full_model
from finetune_launcher.after.parts import after_part
from finetune_launcher.console import ascii_safe
from finetune_launcher.resources import resource

QUIT_WORDS = ("exit", "quit", ":q")
IMAGE_COMMAND = "/image"


def model_options():
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("model (one of)")
    source.add_argument("--adapter", help="adapter directory (a run's best/ or final/); the base comes from it")
    source.add_argument("--model", help="base or merged model: builtin:NAME, hub id or directory")
    common.add_argument("--base", help="with --adapter: base model to apply it to (default: the adapter's own)")
    common.add_argument("--qlora-base", choices=QLORA_BASES, default="dequantized",
                        help="a QLoRA adapter runs on the de-quantized 4-bit base it was trained against (default) "
                             "or on the original full-precision base")
    common.add_argument("--format", default="auto", choices=("auto", "dolly", "alpaca", "chat", "text"),
                        help="prompt template; auto = the format the model was trained on")
    common.add_argument("--image", dest="images", action="append", default=[], metavar="PATH",
                        help="an image for a vision-language model (repeatable: several images, in order)")
    common.add_argument("--max-new-tokens", type=int, default=128)
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, checkpoint's on GPU")
    common.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1")
    common.add_argument("--trust-remote-code", action="store_true")
    return common


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ftl generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    common = model_options()
    text = modes.add_parser("text", parents=[common], help="one generation, printed alone on stdout")
    text.add_argument("--prompt", required=True, help="the instruction (or user message)")
    text.add_argument("--context", default="", help="optional context/input for the instruction")
    demo = modes.add_parser("demo", parents=[common], help="generate for a fixed set of prompts from a file")
    demo.add_argument("--prompts", help="JSONL ({prompt, context, reference, image} or dataset records) or .txt, one "
                                        "prompt a line (default: the shipped demo prompts of the model's recipe, "
                                        "tools/demo_prompts.jsonl or tools/demo_prompts_vl.jsonl)")
    demo.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    modes.add_parser("interactive", parents=[common],
                     help=f"a prompt loop; '{IMAGE_COMMAND} PATH' attaches an image to the next prompt; empty line or "
                          f"'exit' to stop")
    return parser.parse_args(argv)


def note(message):
    print(ascii_safe(message), file=sys.stderr, flush=True)


def check_source(args):
    """Fail on a wrong model choice or adapter path before the slow imports."""
    if bool(args.adapter) == bool(args.model):
        raise AdapterError("pass exactly one of --adapter DIR (an adapter on its base) and --model REF (a base or "
                           "merged model)")
    if args.base and not args.adapter:
        raise AdapterError("--base goes with --adapter; to generate from a base model pass it with --model")
    if args.adapter:
        check_adapter_dir(args.adapter)


def load(args):
    device = pick_device(args.device)
    if args.adapter:
        base_note = qlora_note([args.adapter], args.qlora_base)
        if base_note:
            note(base_note)
        return load_adapter(args.adapter, args.base, args.dtype, device, args.trust_remote_code, args.qlora_base)
    return load_full_model(args.model, args.dtype, device, args.trust_remote_code)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_source(args)
    check_images(args.images)
    from finetune_launcher.after.generation import GenerationSettings, PromptCase

    loaded = load(args)
    part = after_part(loaded.recipe)
    if args.images and not part.TAKES_IMAGES:
        raise AdapterError(f"--image needs a vision-language model; {loaded.source} is a {part.LABEL} model without "
                           f"a vision tower (pass a vision-language run's adapter, e.g. outputs/tiny_vl_lora/best)")
    cases = demo_cases(args, part) if args.mode == "demo" else None
    fmt = part.prompt_format(args.format, loaded.info)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    note(f"model: {loaded.source}; prompt template: {fmt}; "
         f"{'greedy' if settings.temperature <= 0 else f'sampling at temperature {settings.temperature}'}")
    answer = part.answerer(loaded, fmt, settings)
    if args.mode == "text":
        print(ascii_safe(answer(PromptCase(args.prompt, args.context, images=args.images or None))))
    elif args.mode == "demo":
        run_demo(cases, answer)
    else:
        run_interactive(answer, PromptCase, args.images, part.TAKES_IMAGES)
    return 0


def check_images(paths):
    for path in paths:
        if not Path(path).is_file():
            raise AdapterError(f"--image {path}: image file not found")


def demo_cases(args, part):
    """The prompts of --prompts (default: the recipe's shipped demo prompts), with --image where they name none."""
    from finetune_launcher.after.generation import read_prompt_file

    cases = read_prompt_file(args.prompts or resource(part.DEMO_PROMPTS))
    return [with_default_images(c, args.images) for c in (cases[:args.limit] if args.limit else cases)]


def with_default_images(case, images):
    """--image goes with the prompts that name no image of their own."""
    if images and not case.images and not case.messages:
        case.images = list(images)
    return case


def run_demo(cases, answer):
    for number, case in enumerate(cases, start=1):
        context = f" [{case.context}]" if case.context else ""
        images = f" (image{'s' if len(case.images) > 1 else ''} {', '.join(map(str, case.images))})" \
            if case.images else ""
        print(ascii_safe(f"[{number}/{len(cases)}] {case.instruction}{context}{images}"))
        print(ascii_safe(f"  -> {answer(case)}"))
        if case.reference:
            print(ascii_safe(f"  reference: {case.reference}"))


def run_interactive(answer, make_case, default_images, vision):
    """Answer each line; `/image PATH` lines attach images to the next prompt (else --image's go with it). A bad
    image is reported and the loop goes on."""
    from finetune_launcher.data.records import DataError

    note("type a prompt and press Enter; an empty line, 'exit' or Ctrl-D ends. Each prompt is answered on its own."
         + (f" '{IMAGE_COMMAND} PATH' attaches an image to the next prompt." if vision else ""))
    pending = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line or line.lower() in QUIT_WORDS:
            return
        if line.startswith(IMAGE_COMMAND + " ") or line == IMAGE_COMMAND:
            attach_image(line[len(IMAGE_COMMAND):].strip(), pending, vision)
            continue
        try:
            print(ascii_safe(answer(make_case(line, images=pending or list(default_images) or None))), flush=True)
        except DataError as error:
            note(f"error: {error}")
        pending = []


def attach_image(path, pending, vision):
    if not vision:
        note(f"error: {IMAGE_COMMAND} needs a vision-language model; this one reads text only")
    elif not path or not Path(path).is_file():
        note(f"error: image file not found: '{path}'; type {IMAGE_COMMAND} PATH")
    else:
        pending.append(path)
        note(f"image {path} goes with the next prompt ({len(pending)} attached)")
