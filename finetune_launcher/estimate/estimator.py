"""The estimate of a RunSpec by its recipe's model, and the single changes that fit when the run does not (fastest
first).

Each recipe's estimate part (recipe_table.part(recipe, "estimate"), the module recipes/<name>/estimate.py) gives:
  spec_fields(config) -> dict                  the RunSpec fields only this recipe reads from a resolved run config
                                               (what a row holds, the dataset's size)
  estimate(spec, calibration, device) -> Estimate   its model of memory and time (the language model's for
                                               causal_lm and vision_language: estimate/language.py)"""
from dataclasses import replace

from finetune_launcher import recipe_table
from finetune_launcher.estimate.inputs import GIB, EstimateError


def estimate(spec, calibration=None, device=None, with_alternatives=True):
    """The full estimate for `spec`. `calibration`: a dict as load_calibration() returns (None: cold)."""
    spec.validate()
    result = estimate_part(spec.recipe).estimate(spec, calibration, device)
    if with_alternatives:
        result.alternatives = rank_alternatives(result, calibration, result.device)
    return result


def estimate_part(recipe):
    """The recipe's estimate part (see the module doc), from the recipe table."""
    try:
        part = recipe_table.part(recipe, "estimate")
    except recipe_table.UnknownRecipe as error:
        raise EstimateError(str(error)) from None
    if part is None:
        raise EstimateError(f"recipe '{recipe}' has no estimate part (recipe_table: modules['estimate'])")
    return part


def candidate_changes(spec):
    changes = []
    if spec.zero_stage == 2:
        changes.append(("ZeRO-3", dict(zero_stage=3)))
    if not spec.gradient_checkpointing:
        changes.append(("gradient checkpointing", dict(gradient_checkpointing=True)))
    else:
        changes.append(("no gradient checkpointing", dict(gradient_checkpointing=False)))
    if spec.micro_batch_size > 1:
        changes.append((f"micro-batch {spec.micro_batch_size // 2} x accumulation "
                        f"{spec.gradient_accumulation_steps * 2}",
                        dict(micro_batch_size=spec.micro_batch_size // 2,
                             gradient_accumulation_steps=spec.gradient_accumulation_steps * 2)))
    if not spec.offload and spec.mode != "qlora":
        changes.append(("CPU offload", dict(offload=True)))
        if spec.zero_stage == 2:
            changes.append(("ZeRO-3 + CPU offload", dict(zero_stage=3, offload=True)))
    if spec.mode == "full":
        changes.append(("LoRA instead of a full fine-tune", dict(mode="lora")))
    if spec.mode in ("full", "lora"):
        changes.append(("QLoRA", dict(mode="qlora", offload=False)))
    if spec.zero_stage == 2 and not spec.gradient_checkpointing:
        changes.append(("ZeRO-3 + gradient checkpointing", dict(zero_stage=3, gradient_checkpointing=True)))
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
