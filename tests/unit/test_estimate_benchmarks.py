"""The estimator re-predicts the measured runs kept in docs/benchmarks/ (no run here: the measurements are data)
and stays within the tolerances docs/estimation.md states for them ("Checked against measurements")."""
import argparse
import json

import pytest

from tests.conftest import REPO
from bench.benchlib import predict
from finetune_launcher.estimate import cpu_device, fit_calibration, resolve_device

BENCHMARKS = REPO / "docs" / "benchmarks"
GPU_MEMORY_TOLERANCE = 0.10       # predicted peak without margin vs the largest reserved peak
GPU_COLD_TIME_TOLERANCE = 0.20    # gpu_matrix, ZeRO-2 and full ZeRO-3
GPU_CALIBRATED_TOLERANCE = 0.11   # gpu_matrix, leave-one-out median factor
LIGER_COLD_TIME_TOLERANCE = 0.35  # bench, Liger's kernels: the cold estimate runs high (one MFU factor)
CPU_COLD_TOLERANCE = 0.20
CPU_CALIBRATED_TOLERANCE = 0.15
# Measured before LoRA adapters stayed whole under ZeRO-3 (persistence threshold): the adapters were gathered per
# module on every pass then (docs/benchmarks.md), which today's runs do not do.
GPU_MATRIX_STALE_TIMES = {"lora-z3", "qlora-z3"}


def relative_error(predicted, measured):
    return predicted / measured - 1


def as_measured(config):
    """The gpu_matrix runs were measured on DeepSpeed before the trainer applied Liger's kernels, compiled its layers
    and ZeRO-3 gathered per layer (zero_stage 3 on a GPU now runs FSDP2)."""
    return dict(config, liger_kernel=False, zero3_gather="module", compile_layers=False, engine="deepspeed")


def gpu_matrix_rows():
    cases = json.loads((BENCHMARKS / "gpu_matrix_h200.json").read_text())["cases"]
    device = resolve_device("H200")
    return [(case, predict(as_measured(case["config"]), case["processes"], device, {}), device)
            for case in cases if "step_time_s" in case]


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


@pytest.fixture(scope="module")
def gpu_matrix():
    return gpu_matrix_rows()


def test_gpu_matrix_memory_within_tolerance(gpu_matrix):
    for case, cold, _ in gpu_matrix:
        error = relative_error(cold.peak_bytes / 2**30, case["peak_reserved_gib"])
        assert abs(error) <= GPU_MEMORY_TOLERANCE, (case["case"], error)


def test_gpu_matrix_cold_and_calibrated_step_times_within_tolerance(gpu_matrix):
    timed = [(case, cold, device) for case, cold, device in gpu_matrix if case["case"] not in GPU_MATRIX_STALE_TIMES]
    factors = {case["case"]: fit_calibration(cold, case["step_time_s"], case["case"])["factor"]
               for case, cold, _ in timed}
    for case, cold, device in timed:
        assert abs(relative_error(cold.step_time_s, case["step_time_s"])) <= GPU_COLD_TIME_TOLERANCE, case["case"]
        factor = median(f for name, f in factors.items() if name != case["case"])  # no case predicts itself
        calibration = {f"{device.name}/{cold.precision}": {"factor": factor}}
        calibrated = predict(as_measured(case["config"]), case["processes"], device, calibration)
        error = relative_error(calibrated.step_time_s, case["step_time_s"])
        assert abs(error) <= GPU_CALIBRATED_TOLERANCE, (case["case"], error)


def bench_cases():
    found = []
    for name in ("bench_h200_run1.json", "bench_h200_run3.json"):
        for case in json.loads((BENCHMARKS / name).read_text())["cases"]:
            if case.get("config") and "step_time_s" in case:  # our trainer's cases (the HF baseline has none)
                found.append(pytest.param(case, id=f"{name}:{case['case']}"))
    return found


@pytest.mark.parametrize("case", bench_cases())
def test_bench_runs_with_liger_within_tolerance(case):
    """Our trainer at its defaults on one H200 (Liger's kernels, checkpointing auto). The full fine-tune (Qwen2.5-3B
    shape) reserved 15.7 GiB beyond what it allocated, more than the 10% margin: its memory is checked against the
    allocated peak; its step time is not (23.5% MFU measured against the 40% assumed: docs/benchmarks.md)."""
    cold = predict(dict(case["config"], compile_layers=False), 1, resolve_device("H200"), {})  # before compiling
    full = case["config"]["mode"] == "full"
    peak = case["peak_allocated_gib"] if full else case["peak_reserved_gib"]
    assert abs(relative_error(cold.peak_bytes / 2**30, peak)) <= GPU_MEMORY_TOLERANCE
    if not full:
        assert abs(relative_error(cold.step_time_s, case["step_time_s"])) <= LIGER_COLD_TIME_TOLERANCE


def test_cpu_accuracy_cases_within_tolerance():
    """bench/estimate_accuracy.py's cases on the 2-core machine docs/estimation.md describes: calibrated on the
    first case, the seven others predicted."""
    from bench.estimate_accuracy import CASES, case_config

    measured = json.loads((BENCHMARKS / "estimate_accuracy_cpu.json").read_text())["cases"]
    args = argparse.Namespace(model="builtin:small-llama", dataset="data/tiny_instruct.jsonl", seq_len=256,
                              micro_batch=2)
    device = cpu_device(2, cores=2)
    calibration = None
    for (label, change), case in zip(CASES, measured, strict=True):
        assert case["label"] == label
        config = case_config(args, change)
        cold = predict(config, 2, device, {})
        assert abs(relative_error(cold.step_time_s, case["measured_s"])) <= CPU_COLD_TOLERANCE, label
        if calibration is None:
            entry = fit_calibration(cold, case["measured_s"], label)
            calibration = {entry["key"]: entry}
            continue
        calibrated = predict(config, 2, device, calibration)
        assert abs(relative_error(calibrated.step_time_s, case["measured_s"])) <= CPU_CALIBRATED_TOLERANCE, label



COMPILED_COLD_TIME_TOLERANCE = 0.20   # the default GPU path (compiled layers, ddp engine), cold
COMPILED_CALIBRATED_TOLERANCE = 0.10  # the same, leave-one-out median factor


def compiled_cases():
    """Our LoRA/QLoRA runs on the default GPU path (ddp engine, compiled decoder layers, Liger's fused
    cross-entropy) on one H200: issue 20's table of record (Llama-3-8B shape, with and without checkpointing, QLoRA)
    and issue 31's Qwen2.5-32B shape. The 8B text-block row and the 32B row fitted the compiled-layers model's two
    efficiencies (docs/estimation.md); checkpointing and QLoRA were not used in the fit."""
    found = []
    for name, cases in (("bench_h200_issue20_call3.json", ("ours", "ours-gc", "ours-qlora")),
                        ("bench_h200_issue31_32b.json", ("ours",))):
        for case in json.loads((BENCHMARKS / name).read_text())["cases"]:
            if case["case"] in cases and "step_time_s" in case:
                found.append((f"{name}:{case['case']}", case))
    return found


def test_compiled_layer_runs_within_tolerance():
    device = resolve_device("H200")
    rows = [(name, case, predict(case["config"], 1, device, {})) for name, case in compiled_cases()]
    assert len(rows) == 4
    factors = {name: fit_calibration(cold, case["step_time_s"], name)["factor"] for name, case, cold in rows}
    for name, case, cold in rows:
        assert cold.timing["compiled_layers_model"], name
        assert abs(relative_error(cold.peak_bytes / 2**30, case["peak_reserved_gib"])) <= GPU_MEMORY_TOLERANCE, name
        assert abs(relative_error(cold.step_time_s, case["step_time_s"])) <= COMPILED_COLD_TIME_TOLERANCE, name
        factor = median(f for other, f in factors.items() if other != name)
        calibrated = predict(case["config"], 1, device, {f"{device.name}/{cold.precision}": {"factor": factor}})
        assert abs(relative_error(calibrated.step_time_s, case["step_time_s"])) <= COMPILED_CALIBRATED_TOLERANCE, name


def test_text_blocks_have_no_attention_mask_packed_rows_do():
    """Full text blocks run SDPA's causal kernel without a mask (no s^2 mask, GQA's k/v not repeated, half the
    attention FLOPs); packed instruction rows carry the block-diagonal mask."""
    from finetune_launcher.estimate import RunSpec, estimate, load_architecture
    from finetune_launcher.estimate.activations import activation_shape, attention_saved_bytes

    device = resolve_device("H200")
    common = dict(model="random:llama-3-8b", micro_batch_size=2, gradient_checkpointing=False, gpu="H200",
                  compile_layers=True)
    specs = {"text": RunSpec(**common, text_blocks=True), "packed": RunSpec(**common)}
    arch = load_architecture("random:llama-3-8b")
    saved = {k: attention_saved_bytes(arch, spec, activation_shape(spec, "bf16")) for k, spec in specs.items()}
    assert "mask" not in saved["text"] and saved["packed"]["mask"] > 0
    assert saved["text"]["q_k_v"] < saved["packed"]["q_k_v"]  # k/v repeated to every head only with a mask
    text, packed = (estimate(spec, calibration={}, device=device, with_alternatives=False) for spec in specs.values())
    assert text.timing["terms"]["attention_s"] < packed.timing["terms"]["attention_s"]
    assert text.memory["activations"] < packed.memory["activations"]


def test_fsdp2_runs_within_tolerance():
    """Issue 29's FSDP2 cases on one H200 (LoRA, QLoRA on the Llama-3-8B shape, full on Qwen2.5-3B) beside the
    unsharded ones of the same call: the FSDP2 memory model (fp32 master shards, two gathered units, no fused
    cross-entropy) within the GPU memory tolerance, the step time within the cold tolerance."""
    device = resolve_device("H200")
    cases = json.loads((BENCHMARKS / "bench_h200_issue29.json").read_text())["cases"]
    rows = [(case, predict(case["config"], 1, device, {})) for case in cases if "step_time_s" in case]
    assert {case["case"] for case, _ in rows} >= {"ours-fsdp2", "ours-qlora-fsdp2", "ours-full-fsdp2"}
    for case, cold in rows:
        assert cold.spec.engine == ("fsdp2" if "fsdp2" in case["case"] else "ddp"), case["case"]
        assert abs(relative_error(cold.peak_bytes / 2**30, case["peak_reserved_gib"])) <= GPU_MEMORY_TOLERANCE, \
            case["case"]
        assert abs(relative_error(cold.step_time_s, case["step_time_s"])) <= COMPILED_COLD_TIME_TOLERANCE, case["case"]
