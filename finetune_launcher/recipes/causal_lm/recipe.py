"""Causal-LM fine-tuning (full, LoRA, QLoRA), top to bottom: setup (tokenizer, rows, model, engine), the shared
loop, finish.

    bash launch/train_lora.sh configs/tiny_lora.yaml      (train_full.sh, train_qlora.sh; --zero 3, --offload, ...)
"""
from functools import partial

from finetune_launcher.console import say, warn
from finetune_launcher.data.prepared import rank_rows
from finetune_launcher.data.sampling import ShardedSampler
from finetune_launcher.data.text import collate
from finetune_launcher.engines import build_engine, engine_name
from finetune_launcher.lm_task import LanguageModelTask
from finetune_launcher.loop import train
from finetune_launcher.models.prepare import count_parameters
from finetune_launcher.recipes.causal_lm.data import prepare_rows
from finetune_launcher.recipes.causal_lm.model import load_model, load_tokenizer


def run(cfg, ctx, watch):
    # ---- setup
    tokenizer = load_tokenizer(cfg)
    data = rank_rows(cfg, prepare_rows)
    report_data(data.stats, cfg)
    model, keepalive = load_model(cfg, ctx.device)
    params = count_parameters(model)
    say(f"model {cfg.model}: {params[1] / 1e6:.2f}M parameters, {params[0] / 1e6:.3f}M trainable ({cfg.mode}, "
        f"{engine_name(cfg)}, {cfg.precision}, {ctx.world} "
        f"process{'es' if ctx.world > 1 else ''})")
    engine = build_engine(model, cfg, ctx.device, ctx.world)
    sampler = ShardedSampler(len(data.train_rows), ctx.rank, ctx.world, cfg.micro_batch_size,
                             cfg.gradient_accumulation_steps, cfg.seed)
    collate_rows = partial(collate, pad_id=data.extras["pad_id"], packed=data.extras["packed"])
    task = LanguageModelTask(cfg, ctx, model, tokenizer, sampler, data.train_rows, data.eval_rows, collate_rows,
                             data.stats)
    # ---- the loop, then best/ and final/
    outcome = train(cfg, ctx, task, engine, watch, params)
    del keepalive
    return outcome


def report_data(stats, cfg):
    packed = f", {100 * stats['nonpad_fraction']:.1f}% non-pad (packed)" if stats["packed"] else ""
    say(f"data {cfg.dataset} ({stats['format']}): {stats['train_examples']} train / {stats['eval_examples']} eval "
        f"examples -> {stats['train_rows']} rows of up to {cfg.max_length} tokens{packed}")
    if stats["truncated"] or stats["dropped_no_response"]:
        warn(f"max_length {cfg.max_length}: {stats['truncated']} examples lost response tokens to truncation, "
             f"{stats['dropped_no_response']} had no response token left and were dropped")
