"""The stack our users run today, as the baseline of bench/bench.py: Hugging Face Trainer + PEFT LoRA + SDPA (+ gradient
checkpointing, or + Liger's kernels through TrainingArguments(use_liger_kernel=True)), one process, same random-init
model shape, same data, same tokens per optimizer step.

    python bench/hf_baseline.py --model random:llama-3-8b --data corpus.jsonl --seq-len 2048 --micro-batch 2 \\
        --grad-accum 2 --steps 12 --gradient-checkpointing --json out.json
    python bench/hf_baseline.py ... --liger --profile profile.json      # hf-liger, with a torch.profiler summary

    python bench/hf_baseline.py --model DIR --vl-data data/tiny_vl/train.jsonl --seq-len 512 ...   # image + text
    python bench/hf_baseline.py --model random:qwen3-vl-32b --vl-data rows.jsonl --qlora --fp16 --lora-r 8 \
        --lora-targets q_proj,k_proj,v_proj,o_proj --lora-dropout 0.05 --max-pixels 262144 --gradient-checkpointing

Prints and writes: median step time after the warm-up, tokens/s, peak GPU memory and the loss of every step. With
--vl-data (a vision-language model directory, bench/bench_vl.py): AutoModelForImageTextToText and its processor,
the rows and micro-batches our VL recipe makes (finetune_launcher/data), LoRA on the language model's linears;
tokens/s counts the non-pad tokens of each step, image tokens included, as our trainer does. A `random:`
vision-language shape is built on the GPU as our trainer builds it (with --qlora its language model's layers in NF4
as they are made: finetune_launcher/recipes/causal_lm/model.py random_4bit_model), then HF's QLoRA recipe: peft's
prepare_model_for_kbit_training, LoRA, the Trainer with --fp16 (autocast and its GradScaler; the scale of every step
is recorded) or bf16.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune_launcher.profiling import StepProfiler  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--data", help="JSONL with a `text` field")
    p.add_argument("--vl-data", help="image + text conversations (JSONL) for a vision-language --model directory")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list (q_proj,k_proj,...)")
    p.add_argument("--qlora", action="store_true", help="NF4 with double quantisation (vision-language, random: "
                                                        "shapes)")
    p.add_argument("--fp16", action="store_true", help="fp16 with the Trainer's loss scaling instead of bf16")
    p.add_argument("--max-pixels", type=int, help="the image processor's bound (vision-language)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--liger", action="store_true", help="TrainingArguments(use_liger_kernel=True)")
    p.add_argument("--profile", metavar="FILE", help="torch.profiler summary of 3 steps after the measured ones "
                                                     "(finetune_launcher/profiling.py) as JSON")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def build_model(model_ref, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_launcher.models.references import is_builtin, resolve_model_path

    path = resolve_model_path(model_ref)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        if is_builtin(model_ref):  # the same weights our trainer starts from
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        else:  # random:ARCH, built on the GPU like our trainer does
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                     attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def build_dataset(path, model_ref, seq_len, rows_needed):
    import torch

    from finetune_launcher.data.text import tokenize_text_blocks
    from finetune_launcher.models.references import resolve_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_ref))
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = tokenize_text_blocks(records, tokenizer, seq_len)
    if len(rows) < rows_needed:
        sys.exit(f"{path}: {len(rows)} rows of {seq_len} tokens, need {rows_needed}; make the corpus bigger")
    return [{"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels)} for r in rows[:rows_needed]]


def compute_dtype(args):
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.float16 if args.fp16 else torch.bfloat16


def build_vl(args, rows_needed):
    """(LoRA model, rows, collator counting non-pad tokens) for a vision-language model directory or random: shape."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    from finetune_launcher.recipes.vision_language.data import load_vl_rows
    from finetune_launcher.recipes.vision_language.batching import VLCollator
    from finetune_launcher.models.prepare import random_4bit_model
    from finetune_launcher.models.references import is_random, resolve_model_path
    from finetune_launcher.recipes.vision_language.model import (load_processor, lora_target_pattern, meta_layout,
                                                                  module_layout)

    dtype = compute_dtype(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model_path(args.model)
    torch.manual_seed(0)
    if args.qlora:
        layout = meta_layout(path, False)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
                                   llm_int8_skip_modules=[*layout["vision"], layout["lm_head"]])
        if is_random(args.model):
            model = random_4bit_model(path, AutoModelForImageTextToText, quant, device, "sdpa")
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                                quantization_config=quant, device_map={"": device})
    elif is_random(args.model):
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                            attn_implementation="sdpa")
    else:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if args.qlora:  # HF's QLoRA recipe: everything not 4-bit to fp32, checkpointing with input gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
    target = lora_target_pattern(module_layout(model), targets, False, args.model)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                             lora_dropout=args.lora_dropout, target_modules=target,
                                             task_type="CAUSAL_LM"))
    # AutoProcessor (without torchvision, as on this project's CPU stack, the same class without its video processor)
    processor = load_processor(SimpleNamespace(model=args.model, trust_remote_code=False, min_pixels=None,
                                               max_pixels=args.max_pixels))
    rows, _ = load_vl_rows(args.vl_data, processor, args.seq_len)
    if len(rows) < rows_needed:
        sys.exit(f"{args.vl_data}: {len(rows)} rows, need {rows_needed}")
    collate = VLCollator(processor)
    counted = []

    def collate_and_count(batch_rows):
        batch = collate(batch_rows)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    return model, rows[:rows_needed], collate_and_count, counted


def main():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    args = parse_args()
    if bool(args.data) == bool(args.vl_data):
        sys.exit("give --data (text) or --vl-data (image + text), one of them")
    total_steps = args.steps + (3 if args.profile else 0)  # the profiled steps come after the measured ones
    rows_needed = total_steps * args.micro_batch * args.grad_accum
    counted = None
    if args.vl_data:
        model, data, collator, counted = build_vl(args, rows_needed)
    else:
        if args.qlora:
            sys.exit("--qlora is for vision-language shapes here (--vl-data)")
        model = build_model(args.model, compute_dtype(args))
        targets = LORA_TARGETS if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 lora_dropout=args.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
        data, collator = build_dataset(args.data, args.model, args.seq_len, rows_needed), default_data_collator

    step_ends, scales = [], []
    profiler = StepProfiler(args.profile, args.steps + 1, args.steps + 3)

    class Timer(TrainerCallback):
        def on_step_begin(self, _args, state, *_rest, **_kwargs):
            if profiler.path and state.global_step + 1 == profiler.first:
                profiler.start()

        def on_step_end(self, _args, state, *_rest, **_kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
            if scaler is not None:  # fp16: the GradScaler's scale after this step
                scales.append(float(scaler.get_scale()))
            if profiler.profile is not None and state.global_step == profiler.last:
                profiler.stop()

    training_args = TrainingArguments(
        output_dir="/tmp/hf_baseline", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=total_steps, learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, bf16=torch.cuda.is_available() and not args.fp16,
        fp16=args.fp16, logging_steps=1,
        save_strategy="no", report_to=[], gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, seed=0,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), use_liger_kernel=args.liger)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator,
                      callbacks=[Timer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start] + step_ends[:-1], step_ends)][args.warmup:args.steps]
    median = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    if counted:  # the measured steps' own token counts (rows vary in length)
        per_step = [sum(counted[i:i + args.grad_accum]) for i in range(0, len(counted), args.grad_accum)]
        rates = sorted(n / t for n, t in zip(per_step[args.warmup:args.steps], times))
        tokens = sorted(per_step[args.warmup:args.steps])[len(times) // 2]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][:args.steps]
    result = {"stack": "HF Trainer + PEFT", "gradient_checkpointing": args.gradient_checkpointing,
              "liger": args.liger,
              "step_time_s": median, "tokens_per_s": rates[len(rates) // 2] if counted else tokens / median,
              "tokens_per_step": tokens,
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
              "losses": losses, "optimizer": training_args.optim if isinstance(training_args.optim, str)
              else training_args.optim.value, "precision": "fp16" if args.fp16 else str(compute_dtype(args)),
              "qlora": args.qlora, "lora_r": args.lora_r, "lora_targets": args.lora_targets,
              "loss_scales": scales or None}
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
