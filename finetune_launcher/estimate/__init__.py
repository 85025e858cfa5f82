"""Memory and time estimates for a fine-tune before it is launched, and their calibration against measured steps.

Memory per GPU (bytes held by each rank), term by term:
  weights      parameters in the compute dtype (NF4 with double quantisation for QLoRA's linear layers), whole on
               every rank under ZeRO-2, 1/N of them under ZeRO-3;
  gradients    backward: the rank's gradient partition in the compute dtype and the reduce bucket(s); optimizer
               step: the fp32 copy of the partition (ZeRO-3 keeps the backward buffers too);
  optimizer    fp32 master weights + Adam's two moments of the rank's partition (12 bytes per trainable parameter
               / N), on the CPU with offload;
  activations  bytes saved for backward by one micro-batch, the checkpointed layer inputs with gradient
               checkpointing, and the fp32 log-softmax of the logits;
  other        transients (the logits' gradient buffers, the layer recomputed under checkpointing, ZeRO-3's gathered
               parameters), the runtime (CUDA context, NCCL) and a stated margin.
The peak is the larger of the backward phase (activations alive) and the optimizer step (fp32 gradient copy alive).

Time per optimizer step: see step_time.py; `--measure` and `--from-history` refit the throughput term.

The estimate is of a RunSpec, whose fields are the resolved run config's keys by their own names (from_config.py
builds it from a resolved config; the estimator decides none of the config's `auto` settings). The run's recipe
gives its part of the estimate through the recipe table (estimator.py lists what a part gives): causal_lm and
vision_language the language model's (language.py; a vision tower adds its terms through the architecture:
recipes/vision_language/estimate_tower.py), diffusion its own (recipes/diffusion/estimate.py).

Modules: inputs (RunSpec, EstimateError), architectures (+ meta_model: AutoConfig and exact counts on the meta
device; the offline table is finetune_launcher/models/arch_table.py), parameters, devices (gpu_table.json),
model_states, activations, step_time, calibration, totals (the peak, the run's steps), language, estimator, report,
from_config (+ dataset_size), measurement, trainer_log, cli (the estimate command).
Importing this package never imports torch; a model given by a config.json does (transformers' AutoConfig), and so
does every diffusion estimate (diffusers' models on the meta device).
"""
from finetune_launcher.estimate.activations import activation_terms, transient_terms
from finetune_launcher.estimate.architectures import (Architecture, architecture_from_config, architecture_from_table,
                                                      known_models, load_architecture)
from finetune_launcher.estimate.calibration import (calibration_factor, calibration_key, calibration_path,
                                                    fit_calibration, load_calibration, measured_step_time,
                                                    save_calibration)
from finetune_launcher.estimate.devices import (Device, cpu_device, detect_device, device_from_cuda_name, known_gpus,
                                                known_interconnects, resolve_device)
from finetune_launcher.estimate.estimator import estimate
from finetune_launcher.estimate.from_config import estimate_from_config, spec_from_config, without_checkpointing
from finetune_launcher.estimate.inputs import GIB, EstimateError, RunSpec
from finetune_launcher.estimate.measurement import (calibrate_from_history, measurement_overrides, run_measurement,
                                                    spec_from_history)
from finetune_launcher.estimate.model_states import nf4_tensor_bytes
from finetune_launcher.estimate.parameters import BaseCounts, ParamCounts, base_counts_from_shapes, count_params
from finetune_launcher.estimate.report import Estimate, format_hours, preflight_text, render_table
from finetune_launcher.estimate.step_time import flops_per_token
from finetune_launcher.estimate.totals import peak_memory, total_optimizer_steps
from finetune_launcher.estimate.trainer_log import EstimateLog, log_estimate_vs_measured
from finetune_launcher.models.arch_table import ARCHITECTURES

__all__ = [
    "ARCHITECTURES", "Architecture", "BaseCounts", "Device", "Estimate", "EstimateError", "EstimateLog", "GIB",
    "ParamCounts", "RunSpec", "activation_terms", "architecture_from_config", "architecture_from_table",
    "base_counts_from_shapes", "calibrate_from_history", "calibration_factor", "calibration_key", "calibration_path",
    "count_params", "cpu_device", "detect_device", "device_from_cuda_name", "estimate", "estimate_from_config",
    "fit_calibration", "flops_per_token", "format_hours", "known_gpus", "known_interconnects", "known_models",
    "load_architecture", "load_calibration", "log_estimate_vs_measured", "measured_step_time",
    "measurement_overrides", "nf4_tensor_bytes", "peak_memory", "preflight_text", "render_table", "resolve_device",
    "run_measurement", "save_calibration", "spec_from_config", "spec_from_history",
    "total_optimizer_steps", "transient_terms", "without_checkpointing",
]
