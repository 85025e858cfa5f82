"""What every recipe's estimate totals the same way: the runtime's bytes per rank, the peak over the phases of a step
and the optimizer steps of the run."""
import math

from finetune_launcher.estimate.inputs import GIB

GPU_RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers
CPU_RUNTIME_GIB = 0.6  # python + torch + deepspeed per process (RSS of an idle rank here)


def runtime_bytes(device):
    return (CPU_RUNTIME_GIB if device.kind == "cpu" else GPU_RUNTIME_GIB) * GIB


def peak_memory(memory, device, margin):
    """(peak bytes, phase, breakdown at the peak). The backward phase holds the activations, the transients and
    the gradient buffers; the optimizer step holds the step's gradient bytes (with the fp32 copy) instead."""
    transients = sum(v for k, v in memory.items() if k.startswith("transient."))
    backward = memory["weights"] + memory["optimizer"] + memory["gradients"] + memory["activations"] + transients
    step = memory["weights"] + memory["optimizer"] + memory["gradients_at_step"]
    phase = "backward" if backward >= step else "optimizer step"
    held = max(backward, step) + memory["runtime"]
    peak = held * (1 + margin)
    in_backward = phase == "backward"
    breakdown = {"weights": memory["weights"],
                 "gradients": memory["gradients"] if in_backward else memory["gradients_at_step"],
                 "optimizer": memory["optimizer"],
                 "activations": memory["activations"] if in_backward else 0.0,
                 "other": (transients if in_backward else 0.0) + memory["runtime"] + held * margin}
    return peak, phase, breakdown


def total_optimizer_steps(spec, row="example"):
    """Steps of the run, as the trainer counts them: rows // world // (micro x accum) per epoch. `row`: what one
    example is called in the note (a picture, for diffusion)."""
    if spec.max_steps:
        return spec.max_steps, "max_steps"
    fill = spec.row_fill
    if spec.tokens:
        rows = math.ceil(spec.tokens / (spec.max_length * fill)) if spec.packing else None
        if rows is None and spec.avg_tokens_per_example:
            rows = math.ceil(spec.tokens / spec.avg_tokens_per_example)
        if rows is None:
            return None, "tokens given without packing: give --examples too"
        note = f"{spec.tokens} tokens packed into rows of {spec.max_length} at {fill:.0%} fill"
    elif spec.examples:
        if spec.packing and spec.avg_tokens_per_example:
            per = min(spec.avg_tokens_per_example, spec.max_length)
            rows = math.ceil(spec.examples * per / (spec.max_length * fill))
            note = f"{spec.examples} {row}s x {per:.0f} tokens packed at {fill:.0%} fill"
        else:
            rows = spec.examples
            note = f"{spec.examples} {row}s, one row each" + \
                   (" (give --avg-tokens-per-example for packing)" if spec.packing else "")
    else:
        return None, "no dataset size given (--examples or --tokens)"
    per_epoch = rows // spec.world_size // (spec.micro_batch_size * spec.gradient_accumulation_steps)
    if per_epoch == 0:
        return 1, note + "; fewer rows than one step needs"
    return max(1, math.ceil(spec.num_epochs * per_epoch)), \
        note + f", {per_epoch} steps per epoch x {spec.num_epochs:g} epochs"
