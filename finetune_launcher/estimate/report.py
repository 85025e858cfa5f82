"""The estimate as a result: the Estimate object (verdict, refusal, JSON), its assumptions, the text table and
the pre-flight line."""
from dataclasses import asdict, dataclass, field

from finetune_launcher.estimate.activations import attention_masked
from finetune_launcher.estimate.architectures import Architecture
from finetune_launcher.estimate.calibration import calibration_path
from finetune_launcher.estimate.devices import Device
from finetune_launcher.estimate.inputs import GIB, RunSpec
from finetune_launcher.estimate.model_states import dtype_bytes, reduce_bucket
from finetune_launcher.estimate.parameters import ParamCounts


@dataclass
class Estimate:
    spec: RunSpec
    arch: Architecture
    device: Device
    precision: str
    counts: ParamCounts
    memory: dict       # bytes by term (see module doc)
    peak_bytes: float
    peak_phase: str
    breakdown: dict    # bytes at the peak, by weights/gradients/optimizer/activations/other
    timing: dict
    total_steps: int
    steps_note: str
    interconnect: str
    assumptions: list
    host_bytes: float = 0.0
    unit: str = "tokens"  # what a step's rows hold and tokens_per_s counts: tokens, or images (diffusion)
    row: str = ""         # one row of the micro-batch, for the table: "seq 2048", "512px pictures"
    alternatives: list = field(default_factory=list)

    @property
    def fits(self):
        return self.peak_bytes <= self.device.memory_gib * GIB

    @property
    def step_time_s(self):
        return self.timing["calibrated_s"] or self.timing["cold_s"]

    @property
    def flops_per_step(self):
        return self.timing["flops_per_token"]["total"] * self.timing["tokens_per_rank_step"]

    @property
    def tokens_per_s(self):
        """Real (non-pad) tokens per second over all ranks."""
        return self.timing["tokens_per_rank_step"] * self.spec.world_size * self.fill / self.step_time_s

    @property
    def fill(self):
        return self.spec.row_fill

    @property
    def total_time_h(self):
        return None if self.total_steps is None else self.total_steps * self.step_time_s / 3600

    @property
    def refusal(self):
        if self.fits:
            return None
        need, have = self.peak_bytes / GIB, self.device.memory_gib
        fix = self.alternatives[0] if self.alternatives else None
        fix_text = (f"suggested fix: {fix['change']} (predicted {fix['memory_gib']:.1f} GiB, "
                    f"{fix['step_time_s']:.2f} s/step)" if fix else
                    "no single change fits: add GPUs or nodes, or use a smaller model")
        return (f"predicted peak memory {need:.1f} GiB per {self.device.name} exceeds its {have:.1f} GiB "
                f"({self._breakdown_text()}); {fix_text}; pass --force to launch anyway")

    def _vision_json(self):
        if not getattr(self.arch, "vision", None):
            return {}
        width, height, tokens, _ = self.arch.vision.picture(self.spec)
        return {"image_size": [width, height], "image_tokens_per_image": tokens,
                "images_per_row": self.spec.images_per_row}

    def _breakdown_text(self):
        return ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.breakdown.items())

    def to_json(self):
        gib = {k: round(v / GIB, 3) for k, v in self.breakdown.items()}
        return {
            "model": self.spec.model, "architecture": self.arch.name, "architecture_source": self.arch.source,
            "mode": self.spec.mode, "device": self.device.name, "precision": self.precision,
            "world_size": self.spec.world_size, "procs_per_node": self.spec.procs_per_node, "nnodes": self.spec.nnodes,
            "params_base": self.counts.base, "params_adapter": self.counts.adapter,
            "params_trainable": self.counts.trainable, "params_quantized_nf4": self.counts.quantized,
            "params_vision": self.counts.vision, **self._vision_json(),
            "memory_per_gpu_gib": {"total": round(self.peak_bytes / GIB, 3), **gib},
            "memory_peak_phase": self.peak_phase,
            "memory_terms_gib": {k: round(v / GIB, 4) for k, v in self.memory.items()},
            "device_memory_gib": round(self.device.memory_gib, 2),
            "host_memory_per_node_gib": round(self.host_bytes / GIB, 3),
            "fits": self.fits, "refusal": self.refusal,
            "step_time_s": round(self.step_time_s, 4),
            "step_time_cold_s": round(self.timing["cold_s"], 4),
            "step_time_calibrated_s": None if self.timing["calibrated_s"] is None
            else round(self.timing["calibrated_s"], 4),
            "calibration_factor": self.timing["calibration_factor"],
            "step_time_terms_s": {k: round(v, 5) for k, v in self.timing["terms"].items()},
            "communication": self.timing["comm"],
            "flops_per_token": self.timing["flops_per_token"],
            "tokens_per_s": round(self.tokens_per_s, 2), "unit": self.unit,
            "tokens_per_step": int(self.timing["tokens_per_rank_step"] * self.spec.world_size * self.fill),
            "total_steps": self.total_steps, "total_steps_note": self.steps_note,
            "total_time_h": None if self.total_time_h is None else round(self.total_time_h, 4),
            "interconnect": self.interconnect if self.spec.nnodes > 1 else None,
            "alternatives": self.alternatives,
            "assumptions": self.assumptions,
            "inputs": asdict(self.spec),
        }



def assumptions_for(result):
    spec, arch, device = result.spec, result.arch, result.device
    t = result.timing
    notes = [
        f"architecture from {arch.source}"
        + (", parameter counts from transformers' model built on the meta device" if arch.counts else
           ", parameter counts from its layer shapes"),
        f"precision {result.precision} ({dtype_bytes(result.precision)} bytes); AdamW with fp32 master weights "
        f"and moments (12 bytes per trainable parameter, /{spec.world_size} ranks)",
        f"rows of {spec.max_length} tokens (padded width); {result.fill:.0%} of them real tokens "
        f"({'packed' if spec.packing else 'unpacked'})",
        f"attention {spec.attn_implementation}"
        + (" with a materialised mask (packing/padding): full s^2 attention FLOPs, K/V repeated for GQA"
           if attention_masked(spec) else " (no mask, causal)"),
        f"ZeRO-{spec.zero_stage}{' + CPU offload' if spec.offload else ''}: reduce bucket "
        f"{reduce_bucket(spec, arch):,} elements (hidden^2, as ds_configs fill 'auto')",
        f"margin {spec.margin:.0%} on top of everything (allocator fragmentation); runtime "
        f"{result.memory['runtime'] / GIB:.1f} GiB per rank",
        f"peak phase: {result.peak_phase} (activations are freed before the optimizer step's fp32 gradient copy)",
        f"{device.name}: {device.memory_gib:.1f} GiB, {device.peak_flops(result.precision) / 1e12:g} TFLOP/s "
        f"{result.precision} peak, "
        + (f"compiled layers: matrix products at {device.tensor_core_efficiency:.0%} of it, LoRA adapters and "
           f"element-wise work by their bytes at {device.memory_efficiency:.0%} of"
           if t.get("compiled_layers_model") else f"MFU {t['mfu_assumed']:.0%} until calibrated,")
        + f" {device.hbm_tbps:g} TB/s memory",
        f"FLOPs per token {t['flops_per_token']['total'] / 1e9:.3g} G "
        f"({'6N' if spec.mode == 'full' else '4N'}{' + 2N recompute' if spec.gradient_checkpointing else ''}"
        f" + attention)",
        "communication not overlapped with compute" if not spec.overlap_comm else
        "communication overlapped with compute (only the excess counts)",
    ]
    if spec.world_size > 1:
        notes.append(f"bus bandwidth {t['comm'].get('busbw_gbps', 0):g} GB/s "
                     f"({device.link if spec.nnodes == 1 else result.interconnect})")
    if spec.mode == "qlora":
        notes.append("QLoRA: nn.Linear layers in NF4 with double quantisation (0.516 bytes/param), embeddings, "
                     "norms and lm_head in the compute dtype; de-quantised on every forward, backward and "
                     "recompute at 2.5 bytes/param of memory traffic")
    if arch.vision:
        notes.append(arch.vision.describe(spec))
    elif arch.vision_params:
        notes.append(f"vision tower: {arch.vision_params:,} parameters, counted in the weights and model states; "
                     f"its activations and FLOPs are not modelled for this model type")
    if arch.is_moe:
        notes.append(f"MoE: {arch.num_experts} experts, {arch.num_experts_per_tok} active per token: active "
                     f"parameters for FLOPs, all parameters for memory and ZeRO-3 traffic; expert weights are 3D "
                     f"parameters (not nn.Linear), so QLoRA leaves them in 16-bit")
    if t["calibration_factor"]:
        notes.append(f"calibrated: device-bound terms x {t['calibration_factor']:.3f} from a measurement on this "
                     f"device ({calibration_path()})")
    return notes


def preflight_text(result):
    mem = result.peak_bytes / GIB
    total = f", {format_hours(result.total_time_h)} for {result.total_steps} steps" if result.total_steps else ""
    verdict = "fits" if result.fits else "DOES NOT FIT"
    calibrated = "calibrated" if result.timing["calibration_factor"] else "cold estimate"
    lines = [f"pre-flight estimate ({result.device.name} x {result.spec.world_size}, {result.precision}): "
             f"{mem:.2f} GiB of {result.device.memory_gib:.1f} GiB per rank ({verdict}; "
             f"{result._breakdown_text().replace(', ', ' + ')} GiB); "
             f"{result.step_time_s:.2f} s/step, {result.tokens_per_s:,.{2 if result.unit == 'images' else 0}f} "
             f"{result.unit}/s{total} ({calibrated})"]
    if result.alternatives and result.fits:
        best = result.alternatives[0]
        lines.append(f"pre-flight: faster option that fits: {best['change']} ({best['step_time_s']:.2f} s/step)")
    return "\n".join(lines)


def format_hours(hours):
    if hours is None:
        return "?"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"



def render_table(result):
    s, c = result.spec, result.counts
    rows = [
        ("model", f"{s.model} ({result.arch.source})"),
        ("mode", f"{s.mode}{f' r={s.lora_r}' if s.mode != 'full' else ''}, ZeRO-{s.zero_stage}"
                 f"{' + offload' if s.offload else ''} on the {s.engine} engine, checkpointing "
                 f"{'on' if s.gradient_checkpointing else 'off'}"),
        ("ranks", f"{s.procs_per_node} per node x {s.nnodes} node(s) of {result.device.name}"),
        ("batch", f"micro {s.micro_batch_size} x {result.row} x accum {s.gradient_accumulation_steps} x "
                  f"{s.world_size} ranks"),
        ("parameters", f"{c.base / 1e9:.3f} B in the model"
                       f"{f', {c.vision / 1e6:.1f} M of them in the vision tower' if c.vision else ''}"
                       f"{f', {c.quantized / 1e9:.3f} B of them in NF4' if c.quantized else ''}"
                       f"{f' + {c.adapter / 1e6:.2f} M adapter' if c.adapter else ''}; "
                       f"{c.trainable / 1e6:.2f} M trainable"),
    ]
    lines = [f"{k:<12} {v}" for k, v in rows]
    lines += ["", f"memory per rank (GiB)       peak phase: {result.peak_phase}"]
    for key, value in result.memory.items():
        indent = "    " if key.startswith("activations.") else "  "
        label = MEMORY_LABELS.get(key, key.replace("transient.", "transient (other): "))
        lines.append(f"{indent}{label:<38} {value / GIB:10.3f}")
    margin = (result.breakdown["other"] - _other_without_margin(result)) / GIB
    lines.append(f"  {'margin (%d%%)' % round(100 * result.spec.margin):<38} {margin:10.3f}")
    lines.append(f"  {'PEAK':<38} {result.peak_bytes / GIB:10.3f}  of {result.device.memory_gib:.1f}"
                 f"  -> {'fits' if result.fits else 'DOES NOT FIT'}")
    if result.host_bytes:
        lines.append(f"  {'host memory per node (offload, loading)':<38} {result.host_bytes / GIB:10.3f}")
    t = result.timing
    lines += ["", "time per optimizer step (s)"]
    for key, value in t["terms"].items():
        lines.append(f"  {key:<38} {value:10.4f}")
    lines.append(f"  {'step (cold)':<38} {t['cold_s']:10.4f}")
    if t["calibrated_s"] is not None:
        lines.append(f"  {'step (calibrated, x%.3f)' % t['calibration_factor']:<38} {t['calibrated_s']:10.4f}")
    lines.append(f"  {result.unit + '/s (all ranks' + (', real tokens)' if result.unit == 'tokens' else ')'):<38} "
                 f"{result.tokens_per_s:10.1f}")
    lines.append(f"  {'total steps':<38} {str(result.total_steps):>10}  ({result.steps_note})")
    lines.append(f"  {'total time':<38} {format_hours(result.total_time_h):>10}")
    if result.alternatives:
        lines += ["", "alternatives that fit" + (" and are faster" if result.fits else "") + ", fastest first"]
        for alt in result.alternatives:
            lines.append(f"  {alt['change']:<38} {alt['memory_gib']:7.2f} GiB {alt['step_time_s']:9.3f} s/step")
    if not result.fits:
        lines += ["", "REFUSED: " + result.refusal]
    lines += ["", "assumptions"] + [f"  - {a}" for a in result.assumptions]
    return "\n".join(lines)


MEMORY_LABELS = {"gradients": "gradients (backward)", "gradients_at_step": "gradients (optimizer step)",
                 "activations": "activations (saved for backward)",
                 "vae_encode": "VAE encode (a phase of its own)"}


def _other_without_margin(result):
    transients = sum(v for k, v in result.memory.items() if k.startswith("transient."))
    return (transients if result.peak_phase == "backward" else 0.0) + result.memory["runtime"]

