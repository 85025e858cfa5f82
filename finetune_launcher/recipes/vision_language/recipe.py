"""Vision-language fine-tuning (Qwen3-VL, Qwen2.5-VL through transformers' image-text-to-text classes; full, LoRA,
QLoRA), top to bottom: setup (processor, image + text rows, model, engine), the shared loop, finish.

    bash launch/train_lora.sh configs/tiny_vl_lora.yaml     (train_qlora.sh, train_full.sh; --zero 3, ...)

The vision tower and its merger stay frozen unless train_merger / lora_vision say otherwise; micro-batches are
length-grouped (finetune_launcher/recipes/vision_language/data.py says why not packed) and a micro-batch without any
image carries a blank one, so every rank runs the vision tower at every step (ZeRO-3 gathers are collective).
"""
from finetune_launcher.console import say, warn
from finetune_launcher.data.prepared import rank_rows
from finetune_launcher.recipes.vision_language.data import prepare_rows
from finetune_launcher.recipes.vision_language.batching import LengthGroupedSampler, VLCollator
from finetune_launcher.engines import build_engine, engine_name
from finetune_launcher.lm_task import LanguageModelTask
from finetune_launcher.loop import train
from finetune_launcher.models.prepare import count_parameters
from finetune_launcher.recipes.vision_language.model import SavedProcessor, load_processor, load_vl_model


def run(cfg, ctx, watch):
    # ---- setup
    processor = load_processor(cfg)
    data = rank_rows(cfg, prepare_rows)
    report_data(data.stats, cfg)
    model, keepalive = load_vl_model(cfg, ctx.device)
    params = count_parameters(model)
    say(f"model {cfg.model}: {params[1] / 1e6:.2f}M parameters, {params[0] / 1e6:.3f}M trainable ({cfg.mode}, "
        f"vision tower {'with LoRA' if cfg.lora_vision else 'frozen'}, merger "
        f"{'trained' if cfg.train_merger else 'frozen'}; {engine_name(cfg)}, {cfg.precision}, {ctx.world} "
        f"process{'es' if ctx.world > 1 else ''})")
    engine = build_engine(model, cfg, ctx.device, ctx.world)
    sampler = LengthGroupedSampler(data.train_rows, ctx.rank, ctx.world, cfg.micro_batch_size,
                                   cfg.gradient_accumulation_steps, cfg.seed)
    task = LanguageModelTask(cfg, ctx, model, SavedProcessor(processor), sampler, data.train_rows, data.eval_rows,
                             VLCollator(processor), data.stats)
    # ---- the loop, then best/ and final/
    outcome = train(cfg, ctx, task, engine, watch, params)
    del keepalive
    return outcome


def report_data(stats, cfg):
    """The rows the run trains on: where they come from (the dataset, the mixed-in pools) and what they hold."""
    mixture = stats.get("mixture")
    sources = ""
    if mixture:
        sources = " (" + ", ".join(f"{count} from {name}" if name == cfg.dataset else f"{count} mixed in from {name}"
                                   for name, count in mixture["counts"].items()) + ")"
    say(f"data {cfg.dataset} (image + text): {stats['train_rows']} train / {stats['eval_rows']} eval rows{sources}: "
        f"{stats['image_rows']} with images ({stats['image_tokens']} image tokens), {stats['text_rows']} text-only")
    if stats["dropped_image_overflow"] or stats["truncated"] or stats["dropped_no_response"]:
        warn(f"max_length {cfg.max_length}: {stats['dropped_image_overflow']} rows dropped because it would cut an "
             f"image (image_overflow: drop), {stats['truncated']} lost response tokens, "
             f"{stats['dropped_no_response']} had no response token left")
