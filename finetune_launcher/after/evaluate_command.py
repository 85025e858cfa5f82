"""Eval loss and perplexity on a held-out file for the base model, best/ and final/ (and merged models), side by
side, as a table and JSON; for vision-language runs also the answer accuracy.

    ftl evaluate --adapter outputs/tiny_lora/best --adapter outputs/tiny_lora/final --data held_out.jsonl
    ftl evaluate --adapter outputs/tiny_lora/best --data held_out.jsonl --json          # JSON on stdout
    ftl evaluate --adapter outputs/tiny_lora/best --data held_out.jsonl --json r.json --save-examples 5
    ftl evaluate --adapter outputs/tiny_vl_lora/best --adapter outputs/tiny_vl_lora/final \\
        --data data/tiny_vl/held_out.jsonl                                    # loss + accuracy on held-out images

The base is read from the adapters (they must share it) unless --base is given; --no-base skips it. QLoRA adapters
run on the de-quantized 4-bit base they were trained against (so does the base row; --qlora-base original: the
full-precision base); LoRA and QLoRA adapters are evaluated in separate runs. The file may be in any training
format (dolly, alpaca, chat, text); examples are tokenised and masked as in training, with the run's max_length.
With --json and no file name the JSON goes to stdout and the table to stderr.

Vision-language adapters and models take an image + text JSONL as training does (same rows and labels). The
accuracy is over the rows that end in their one assistant answer: the greedy answer, lower-cased, without
punctuation and extra spaces, must equal the reference so normalised (--no-accuracy skips it). --save-examples N
writes the first N prompts, image paths, references and generations.
"""
import argparse
import json
import sys
from pathlib import Path

from finetune_launcher.after.bases import QLORA_BASES
from finetune_launcher.after.evaluation import format_table, write_examples
from finetune_launcher.after.loading import (DTYPES, AdapterError, adapter_recipe, check_adapter_dir,
                                             full_model_recipe, resolve_base, same_recipe)
from finetune_launcher.after.parts import after_part
from finetune_launcher.console import ascii_safe
from finetune_launcher.models.references import resolve_model_path

EXAMPLES_FILE = "eval_examples.jsonl"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ftl evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", dest="adapters", action="append", default=[],
                        help="adapter directory (repeat: --adapter run/best --adapter run/final)")
    parser.add_argument("--model", dest="models", action="append", default=[],
                        help="also evaluate a full or merged model (repeatable)")
    parser.add_argument("--data", required=True, help="held-out file (.jsonl, or any file the trainer reads)")
    parser.add_argument("--base", help="base model for the adapters (default: the one they were trained on)")
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--qlora-base", choices=QLORA_BASES, default="dequantized",
                        help="QLoRA adapters run on the de-quantized 4-bit base they were trained against (default) "
                             "or on the original full-precision base")
    parser.add_argument("--format", default="auto", choices=("auto", "dolly", "alpaca", "chat", "text"))
    parser.add_argument("--max-length", type=int, default=0, help="default: the run's max_length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the results as JSON to FILE, or to stdout when no FILE is given")
    parser.add_argument("--save-examples", type=int, default=0, metavar="N",
                        help="generate for the first N examples and write them beside the references")
    parser.add_argument("--examples-out", help=f"where --save-examples writes (default: {EXAMPLES_FILE} in the "
                                               f"run directory of the first adapter, or beside --json FILE)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="for --save-examples and the vision-language accuracy (greedy decoding)")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="vision-language models: the loss only, no answers generated")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def examples_path(args):
    if args.examples_out:
        return Path(args.examples_out)
    if args.json and args.json != "-":
        return Path(args.json).with_name(EXAMPLES_FILE)
    if args.adapters:
        return Path(args.adapters[0]).resolve().parent / EXAMPLES_FILE
    return Path(EXAMPLES_FILE)


def log(message):
    print(ascii_safe(message), file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for adapter in args.adapters:
        check_adapter_dir(adapter)  # a wrong path fails before the slow imports
    from finetune_launcher.after.generation import GenerationSettings  # imports torch: after the paths are checked

    args.generation = GenerationSettings(max_new_tokens=args.max_new_tokens)
    report = evaluate_all(args, log)
    result = report.as_dict()
    if args.save_examples:
        path = write_examples(report, examples_path(args))
        result["examples_file"] = str(path)
        log(f"wrote {len(report.examples)} examples with generations beside the references to {path}")
    print(ascii_safe(format_table(report)), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


def evaluate_all(options, log):
    """Evaluate every model options names with the after part of their (one) recipe."""
    if not options.adapters and not options.models:
        raise AdapterError("nothing to evaluate: pass --adapter DIR and/or --model REF")
    sources = [str(d) for d in options.adapters] + [str(m) for m in options.models]
    recipes = [adapter_recipe(d, resolve_base(d, options.base)[1], options.trust_remote_code)
               for d in options.adapters]
    recipes += [full_model_recipe(m, resolve_model_path(str(m)), options.trust_remote_code) for m in options.models]
    return after_part(same_recipe(sources, recipes)).evaluate(options, log)
