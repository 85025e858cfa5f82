"""The experts' LoRA kernels side by side, in one process (a benchmark, not a test): peft's path (moe_lora_kernel:
peft, the adapter folded into the whole expert weight on every forward) against the grouped one (x.A.B on each
token's expert through grouped GEMMs), on the same weights and batch: forward + backward time (the minimum over
--repeats, the kernels alternating), the bytes autograd keeps for the backward beyond the parameters, the GPU's
peak memory, and how far the outputs and the LoRA gradients of the two differ. The minimum, because on a shared
machine the other load only ever adds time.

    python bench/moe_kernels.py --json OUT.json              # 2 layers of Qwen3-30B-A3B, seq 2048, r=16, a GPU
    python bench/moe_kernels.py --layers 2 --seq-len 1024 --override hidden_size=512 num_experts=64 \\
        moe_intermediate_size=192 num_attention_heads=4 num_key_value_heads=1 vocab_size=1024   # a CPU
"""
import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KERNELS = ("peft", "grouped")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:qwen3-30b-a3b", help="a random: shape or a model directory's config")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config values (ints)")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def model_config(args):
    from transformers import AutoConfig

    from finetune_launcher.models.references import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    config.num_hidden_layers = args.layers
    for item in args.override:
        key, _, value = item.partition("=")
        setattr(config, key, int(value))
    config.use_cache = False
    return config


def build(config, kernel, args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_launcher.recipes.causal_lm.model import prepare_for_training

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    settings = SimpleNamespace(mode="lora", lora=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                               lora_dropout=0.0, lora_target_modules="all-linear", gradient_checkpointing=False,
                               moe_lora_kernel=kernel)
    model = prepare_for_training(model, settings)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the experts' adapter counts in the outputs and gradients
            torch.nn.init.normal_(p, std=0.01)
    return model


def step(model, batch, device):
    """(seconds, bytes kept for the backward beyond the parameters, logits, LoRA gradients)."""
    from finetune_launcher.profiling import kept_for_backward

    model.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    with kept_for_backward(model) as kept:
        out = model(**batch)
    out.loss.backward()
    sync(device)
    seconds = time.perf_counter() - start
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, sum(kept.values()), out.logits.detach().float(), grads


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    import torch

    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args)
    ids = torch.randint(0, min(config.vocab_size, 1000), (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    results = {}
    models = {}
    for kernel in KERNELS:
        models[kernel] = build(config, kernel, args, device, dtype)
    models["grouped"].load_state_dict(models["peft"].state_dict())
    times = {kernel: [] for kernel in KERNELS}
    for _ in range(args.repeats):
        for kernel in KERNELS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, kept, logits, grads = step(models[kernel], batch, device)
            times[kernel].append(seconds)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            results[kernel] = {"kept_for_backward_gib": kept / 2**30, "peak_allocated_gib": peak,
                               "logits": logits, "grads": grads}
    for kernel in KERNELS:
        results[kernel]["step_s"] = min(times[kernel])
        results[kernel]["step_s_all"] = times[kernel]
    reference, other = results["peft"], results["grouped"]
    report = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "model": args.model, "layers": args.layers, "seq_len": args.seq_len,
        "lora_r": args.lora_r, "overrides": args.override,
        "max_abs_logit_diff": float((reference["logits"] - other["logits"]).abs().max()),
        "max_rel_grad_diff": max(float((other["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                                 for n, g in reference["grads"].items()),
        "kernels": {k: {key: v for key, v in results[k].items() if key not in ("logits", "grads")} for k in KERNELS},
    }
    report["grouped_vs_peft_step_time"] = other["step_s"] / reference["step_s"]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
