"""The estimate of a RunSpec: memory by term and its peak phase, step time, total steps, and the single changes
that fit when the run does not (fastest first)."""
import math
from dataclasses import replace

from finetune_launcher.estimate.activations import activation_terms, transient_terms
from finetune_launcher.estimate.architectures import load_architecture
from finetune_launcher.estimate.devices import default_interconnect, resolve_device
from finetune_launcher.estimate.inputs import GIB, EstimateError
from finetune_launcher.estimate.model_states import (dtype_bytes, gradient_bytes, host_bytes_per_node, optimizer_bytes,
                                         resolve_precision, weight_bytes)
from finetune_launcher.estimate.parameters import count_params
from finetune_launcher.estimate.report import Estimate, assumptions_for
from finetune_launcher.estimate.step_time import step_time
from finetune_launcher.recipes.vision_language.estimate import vision_activation_terms, vision_transient_bytes

GPU_RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers
CPU_RUNTIME_GIB = 0.6  # python + torch + deepspeed per process (RSS of an idle rank here)


def estimate(spec, calibration=None, device=None, with_alternatives=True):
    """The full estimate for `spec`. `calibration`: a dict as load_calibration() returns (None: cold)."""
    spec.validate()
    if spec.recipe == "diffusion":
        from finetune_launcher.recipes.diffusion.estimate import estimate_diffusion

        result = estimate_diffusion(spec, calibration, device)
        if with_alternatives:
            result.alternatives = rank_alternatives(result, calibration, result.device)
        return result
    arch = load_architecture(spec.model)
    device = device or resolve_device(spec.gpu, spec.gpus_per_node)
    precision = resolve_precision(spec, device)
    device.peak_flops(precision)  # refuses fp16/bf16 where the device has none
    interconnect = spec.interconnect or default_interconnect(device)
    counts = count_params(arch, spec)
    e = dtype_bytes(precision)
    memory, one_layer = memory_terms(arch, spec, device, counts, precision)
    peak, phase, breakdown = peak_memory(memory, device, spec.margin)
    timing = step_time(arch, spec, device, counts, precision, one_layer, calibration, interconnect)
    total_steps, steps_note = total_optimizer_steps(spec)
    result = Estimate(spec=spec, arch=arch, device=device, precision=precision, counts=counts, memory=memory,
                      peak_bytes=peak, peak_phase=phase, breakdown=breakdown, timing=timing,
                      total_steps=total_steps, steps_note=steps_note, interconnect=interconnect,
                      assumptions=[], host_bytes=host_bytes_per_node(spec, counts, e))
    result.assumptions = assumptions_for(result)
    if with_alternatives:
        result.alternatives = rank_alternatives(result, calibration, device)
    return result


def memory_terms(arch, spec, device, counts, precision):
    e = dtype_bytes(precision)
    grads, grads_at_step = gradient_bytes(spec, arch, counts, e)
    saved, one_layer = activation_terms(arch, spec, precision, device.kind)
    if arch.vision:
        saved.update(vision_activation_terms(arch.vision, spec, e))
    memory = {"weights": weight_bytes(spec, counts, e), "gradients": grads,
              "gradients_at_step": grads_at_step, "optimizer": optimizer_bytes(spec, counts),
              "activations": sum(saved.values())}
    memory.update({f"activations.{k}": v for k, v in saved.items()})
    for key, value in transient_terms(arch, spec, counts, precision, one_layer).items():
        memory[f"transient.{key}"] = value
    if arch.vision:
        memory["transient.vision_forward"] = vision_transient_bytes(arch.vision, spec, e)
    memory["runtime"] = (CPU_RUNTIME_GIB if device.kind == "cpu" else GPU_RUNTIME_GIB) * GIB
    return memory, one_layer


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


def total_optimizer_steps(spec):
    """Steps of the run, as the trainer counts them: rows // world // (micro x accum) per epoch."""
    if spec.max_steps:
        return spec.max_steps, "max_steps"
    fill = spec.row_fill
    if spec.tokens:
        rows = math.ceil(spec.tokens / (spec.seq_len * fill)) if spec.packing else None
        if rows is None and spec.avg_tokens_per_example:
            rows = math.ceil(spec.tokens / spec.avg_tokens_per_example)
        if rows is None:
            return None, "tokens given without packing: give --examples too"
        note = f"{spec.tokens} tokens packed into rows of {spec.seq_len} at {fill:.0%} fill"
    elif spec.examples:
        if spec.packing and spec.avg_tokens_per_example:
            per = min(spec.avg_tokens_per_example, spec.seq_len)
            rows = math.ceil(spec.examples * per / (spec.seq_len * fill))
            note = f"{spec.examples} examples x {per:.0f} tokens packed at {fill:.0%} fill"
        else:
            rows = spec.examples
            note = f"{spec.examples} examples, one row each" + \
                   (" (give --avg-tokens-per-example for packing)" if spec.packing else "")
    else:
        return None, "no dataset size given (--examples or --tokens)"
    per_epoch = rows // spec.world // (spec.micro_batch * spec.grad_accum)
    if per_epoch == 0:
        return 1, note + "; fewer rows than one step needs"
    return max(1, math.ceil(spec.epochs * per_epoch)), note + f", {per_epoch} steps per epoch x {spec.epochs:g} epochs"



def candidate_changes(spec):
    changes = []
    if spec.zero == 2:
        changes.append(("ZeRO-3", dict(zero=3)))
    if not spec.gradient_checkpointing:
        changes.append(("gradient checkpointing", dict(gradient_checkpointing=True)))
    else:
        changes.append(("no gradient checkpointing", dict(gradient_checkpointing=False)))
    if spec.micro_batch > 1:
        changes.append((f"micro-batch {spec.micro_batch // 2} x accumulation {spec.grad_accum * 2}",
                        dict(micro_batch=spec.micro_batch // 2, grad_accum=spec.grad_accum * 2)))
    if not spec.offload and spec.mode != "qlora":
        changes.append(("CPU offload", dict(offload=True)))
        if spec.zero == 2:
            changes.append(("ZeRO-3 + CPU offload", dict(zero=3, offload=True)))
    if spec.mode == "full":
        changes.append(("LoRA instead of a full fine-tune", dict(mode="lora")))
    if spec.mode in ("full", "lora"):
        changes.append(("QLoRA", dict(mode="qlora", offload=False)))
    if spec.zero == 2 and not spec.gradient_checkpointing:
        changes.append(("ZeRO-3 + gradient checkpointing", dict(zero=3, gradient_checkpointing=True)))
    return changes


def rank_alternatives(result, calibration, device):
    """Single changes that fit, fastest first (the same global batch: micro-batch halves, accumulation doubles).
    Listed when the run does not fit, or when one is faster than the run as configured."""
    options = []
    for label, change in candidate_changes(result.spec):
        try:
            other = estimate(replace(result.spec, **change), calibration, device=device, with_alternatives=False)
        except EstimateError:
            continue
        if not other.fits:
            continue
        if result.fits and other.step_time_s >= result.step_time_s * 0.95:
            continue
        options.append({"change": label, "memory_gib": round(other.peak_bytes / GIB, 2),
                        "step_time_s": round(other.step_time_s, 4),
                        "total_time_h": None if other.total_time_h is None else round(other.total_time_h, 3)})
    return sorted(options, key=lambda o: o["step_time_s"])

