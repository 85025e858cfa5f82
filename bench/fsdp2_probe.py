"""Experiment (a benchmark, not a test): is torch's FSDP2 (`fully_shard` per decoder layer) a cheaper ZeRO-3 than
DeepSpeed's hooks? One process on one GPU, the bench's shape (random init, LoRA r=16 on all linears through peft,
bf16, compiled decoder layers), the same step timed in fresh processes one after another in one call (plain,
fsdp2, plain again: the two plain runs show the host's drift):

  plain    replicated weights (what the ddp engine runs)
  fsdp2    every decoder layer and the root sharded with fully_shard (bf16 params, fp32 gradient reduction)

    python bench/fsdp2_probe.py --model random:llama-3-8b --json $OUT/fsdp2_probe.json
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(model_ref, lora_r, compile_layers, sharded):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_launcher.models.compiled_layers import compile_decoder_layers, decoder_layers
    from finetune_launcher.models.references import resolve_model_path
    from finetune_launcher.engines.plain import cast_floating_parameters

    config = AutoConfig.from_pretrained(resolve_model_path(model_ref))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                             target_modules="all-linear"))
    cast_floating_parameters(model, torch.bfloat16)  # as our ddp engine and DeepSpeed's bf16 mode compute
    if compile_layers:  # FSDP2's gather / release hooks stay eager, as ZeRO-3's do
        compile_decoder_layers(model, hooks_outside=sharded)
    return model, decoder_layers(model)


def shard(model, layers):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def time_steps(model, steps, warmup, micro, accum, seq, vocab):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    times, losses = [], []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), device="cuda", generator=generator)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = sorted(times[warmup:])
    return {"step_time_s": measured[len(measured) // 2], "times": times, "losses": losses,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--case", choices=["plain", "fsdp2"], default=None, help="one case (run in its own process)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.case is None:  # each case in a fresh process: memory peaks and compile caches apart
        import subprocess

        rows = []
        for case in ("plain", "fsdp2", "plain"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", case], capture_output=True,
                                 text=True, timeout=280)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            rows.append(json.loads(line[-1][7:]) if line else {"case": case, "error": out.stderr[-3000:]})
            print(json.dumps(rows[-1])[:600], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    model, layers = build(args.model, 16, not args.no_compile, args.case == "fsdp2")
    if args.case == "fsdp2":
        shard(model, layers)
    result = time_steps(model, args.steps, 3, args.micro_batch, args.grad_accum, args.seq_len,
                        model.config.vocab_size)
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    print("RESULT " + json.dumps({"case": args.case, "tokens_per_s": tokens / result["step_time_s"], **result}),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
