"""The estimate of a language model's run (a causal LM, or a vision-language model whose vision tower adds its own
terms through arch.vision): memory by term and its peak phase, step time, total steps."""
from finetune_launcher.estimate.activations import activation_terms, transient_terms
from finetune_launcher.estimate.architectures import load_architecture
from finetune_launcher.estimate.devices import default_interconnect, resolve_device
from finetune_launcher.estimate.model_states import (dtype_bytes, gradient_bytes, host_bytes_per_node, optimizer_bytes,
                                                     weight_bytes)
from finetune_launcher.estimate.parameters import count_params
from finetune_launcher.estimate.report import Estimate, assumptions_for
from finetune_launcher.estimate.step_time import step_time
from finetune_launcher.estimate.totals import peak_memory, runtime_bytes, total_optimizer_steps


def estimate_language_model(spec, calibration=None, device=None):
    """The Estimate of `spec` (validated) on `device` (default: spec.gpu), before alternatives are ranked."""
    arch = load_architecture(spec.model)
    device = device or resolve_device(spec.gpu, spec.procs_per_node)
    device.peak_flops(spec.precision)  # refuses fp16/bf16 where the device has none
    interconnect = spec.interconnect or default_interconnect(device)
    counts = count_params(arch, spec)
    memory, one_layer = memory_terms(arch, spec, device, counts)
    peak, phase, breakdown = peak_memory(memory, device, spec.margin)
    timing = step_time(arch, spec, device, counts, one_layer, calibration, interconnect)
    total_steps, steps_note = total_optimizer_steps(spec)
    result = Estimate(spec=spec, arch=arch, device=device, precision=spec.precision, counts=counts, memory=memory,
                      peak_bytes=peak, peak_phase=phase, breakdown=breakdown, timing=timing,
                      total_steps=total_steps, steps_note=steps_note, interconnect=interconnect,
                      assumptions=[], host_bytes=host_bytes_per_node(spec, counts, dtype_bytes(spec.precision)),
                      unit="tokens", row=f"seq {spec.max_length}")
    result.assumptions = assumptions_for(result)
    return result


def memory_terms(arch, spec, device, counts):
    e = dtype_bytes(spec.precision)
    grads, grads_at_step = gradient_bytes(spec, arch, counts, e)
    saved, one_layer = activation_terms(arch, spec, spec.precision, device.kind)
    if arch.vision:
        saved.update(arch.vision.activation_terms(spec, e))
    memory = {"weights": weight_bytes(spec, counts, e), "gradients": grads,
              "gradients_at_step": grads_at_step, "optimizer": optimizer_bytes(spec, counts),
              "activations": sum(saved.values())}
    memory.update({f"activations.{k}": v for k, v in saved.items()})
    for key, value in transient_terms(arch, spec, counts, spec.precision, one_layer).items():
        memory[f"transient.{key}"] = value
    if arch.vision:
        memory["transient.vision_forward"] = arch.vision.transient_bytes(spec, e)
    memory["runtime"] = runtime_bytes(device)
    return memory, one_layer
