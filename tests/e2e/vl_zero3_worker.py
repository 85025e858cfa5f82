"""Run under torchrun (2 processes on the CPU): the tiny Qwen3-VL under DeepSpeed ZeRO-3 for each mode given, with
rank 0 training on image rows and rank 1 on text-only rows, so rank 1's micro-batches have no image of their own
(the collator adds the blank one). A few optimizer steps and eval forwards; a rank that skipped the vision tower
would leave the other waiting in ZeRO-3's parameter all-gathers. Writes OUT_DIR/MODE-RANK.json:
{"mode", "rank", "losses", "eval_loss", "partitioned", "blank_image"}.

usage: torchrun --nproc_per_node 2 tests/e2e/vl_zero3_worker.py OUT_DIR lora full qlora
"""
import json
import sys
from pathlib import Path

import torch

from tests.conftest import vl_settings
from train.data.text import supervised_tokens
from train.data.vision_language import load_vl_rows
from train.data.vl_batching import VLCollator
from train.distributed import all_reduce_sum, barrier, init_distributed, shutdown_distributed
from train.models.vision_language import load_processor, load_vl_model

REPO = Path(__file__).resolve().parents[2]
MICRO, STEPS = 2, 3
SETTINGS = {"lora": dict(mode="lora", train_merger=True), "full": dict(mode="full"),
            "qlora": dict(mode="qlora", bnb_4bit_quant_storage="float32")}


def ds_config():
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "train_batch_size": 2 * MICRO,
            "gradient_clipping": 1.0, "steps_per_print": 10**6,
            # as train/engine.py fills it (10 x hidden size): the vision tower's and the LM's matrices are sharded
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1280}}


def my_rows(rank, processor):
    rows, _ = load_vl_rows(REPO / "data" / "tiny_vl" / "train.jsonl", processor, 256)
    picked = [r for r in rows if bool(r["images"]) == (rank == 0)]
    return picked[: MICRO * (STEPS + 1)]


def run(mode, rank, device):
    import deepspeed

    cfg = vl_settings(zero_stage=3, deepspeed_dict=ds_config, **SETTINGS[mode])
    processor = load_processor(cfg)
    collate = VLCollator(processor)
    rows = my_rows(rank, processor)
    model, keepalive = load_vl_model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds_config())
    # (QLoRA is built outside zero.Init, as transformers does for quantized models, and sharded here)
    partitioned = any(p.numel() == 0 and getattr(p, "ds_numel", 0) > 0 for p in model.parameters())
    losses, blank = [], False
    for step in range(STEPS):
        batch = collate(rows[step * MICRO:(step + 1) * MICRO])
        blank |= rank == 1 and "pixel_values" in batch
        tokens, = all_reduce_sum([supervised_tokens(batch)], device)
        loss = engine(**batch, num_items_in_batch=tokens / 2).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    with torch.no_grad():
        batch = collate(rows[-MICRO:])
        eval_loss = engine(**batch).loss.item()
    barrier()
    del keepalive
    return {"mode": mode, "rank": rank, "losses": losses, "eval_loss": eval_loss, "partitioned": partitioned,
            "blank_image": blank}


def main():
    rank = init_distributed().rank
    try:
        out = Path(sys.argv[1])
        for mode in sys.argv[2:]:
            (out / f"{mode}-{rank}.json").write_text(json.dumps(run(mode, rank, torch.device("cpu"))))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
