"""The estimator's terms against hand-computed values, the modeling code (meta-device models, peft) and DeepSpeed's
own model-state formulas; the CLI's JSON; errors that list what is known; the pre-flight and calibration."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from tests.conftest import REPO
from train.arch_table import ARCHITECTURES, PUBLISHED_PARAMS
from train.estimate import (EstimateError, EstimateLog, RunSpec, architecture_from_table, count_params,
                            estimate, estimate_from_config, fit_calibration, flops_per_token,
                            load_architecture, measured_step_time, resolve_device)

LLAMA8B = "meta-llama/Meta-Llama-3-8B-Instruct"
L8 = dict(h=4096, q=4096, kv=1024, inter=14336, layers=32, vocab=128256, heads=32, hd=128)


def spec(**kw):
    base = dict(model=LLAMA8B, mode="full", gpus_per_node=8, gpu="H100-80GB", seq_len=4096, micro_batch=1,
                zero=2, gradient_checkpointing=False, precision="bf16", lora_dropout=0.0)
    base.update(kw)
    return RunSpec(**base)


# ------------------------------------------------------------------ parameters

@pytest.mark.parametrize("key", sorted(PUBLISHED_PARAMS))
def test_total_parameters_equal_the_published_counts(key):
    arch = architecture_from_table(key)
    assert count_params(arch, RunSpec(model=key, mode="full")).total == PUBLISHED_PARAMS[key]


def test_llama3_8b_parameters_by_hand():
    c = count_params(load_architecture(LLAMA8B), spec())
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert c.total == 2 * 128256 * 4096 + 32 * per_layer + 4096
    assert c.matmul_per_token == 32 * (per_layer - 2 * 4096) + 128256 * 4096
    assert c.trainable == c.total


_CONFIG_CLASSES = {"qwen2.5": "Qwen2Config", "qwen3-30b": "Qwen3MoeConfig", "qwen3": "Qwen3Config",
                   "llama": "LlamaConfig", "gemma": "Gemma2Config", "mistral": "MistralConfig"}


def _meta_model(key, layers=None):
    import torch
    import transformers

    entry = dict(ARCHITECTURES[key])
    cls = getattr(transformers, next(v for k, v in _CONFIG_CLASSES.items() if key.startswith(k)))
    kwargs = {k: v for k, v in entry.items() if k not in ("names", "qkv_bias", "qk_norm", "norms_per_layer",
                                                           "final_logit_softcap")}
    if layers:
        kwargs["num_hidden_layers"] = layers
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cls(**kwargs))


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_table_counts_equal_the_transformers_model(key):
    model = _meta_model(key)
    assert count_params(architecture_from_table(key), RunSpec(model=key, mode="full")).total == \
        sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key,targets", [("llama-3-8b", "all-linear"), ("llama-3-8b", ["q_proj", "v_proj"]),
                                         ("qwen3-30b-a3b", "all-linear")])
def test_lora_counts_equal_peft(key, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_meta_model(key, layers=2), LoraConfig(r=16, target_modules=targets))
    arch = replace(architecture_from_table(key), num_hidden_layers=2)
    ours = count_params(arch, RunSpec(model=key, mode="lora", lora_rank=16, lora_targets=targets)).lora
    assert ours == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_moe_uses_active_parameters_for_flops_and_all_for_memory():
    arch = load_architecture("Qwen/Qwen3-30B-A3B")
    c = count_params(arch, RunSpec(model="Qwen/Qwen3-30B-A3B", mode="full"))
    assert 30.4e9 < c.total < 30.6e9
    attention = 2048 * 4096 * 2 + 2048 * 512 * 2
    active_mlp = 8 * 3 * 2048 * 768
    assert c.matmul_per_token == 48 * (attention + 2048 * 128 + active_mlp) + 151936 * 2048
    r = estimate(spec(model="Qwen/Qwen3-30B-A3B", zero=3))
    assert r.memory["weights"] == pytest.approx(c.total * 2 / 8)


# ------------------------------------------------------------------ model states

def test_zero2_full_model_states_by_hand_and_deepspeed_formula():
    r = estimate(spec())
    p, n = r.counts.total, 8
    bucket = 4096 ** 2 * 2
    assert r.memory["weights"] == 2 * p
    assert r.memory["optimizer"] == pytest.approx(12 * p / n)
    assert r.memory["gradients"] == pytest.approx(2 * p / n + bucket)
    assert r.memory["gradients_at_step"] == pytest.approx(4 * p / n)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=False)
    ours = r.memory["weights"] + r.memory["optimizer"] + r.memory["gradients"] - bucket + \
        r.memory["gradients_at_step"]
    assert ours == pytest.approx(deepspeed_gpu, rel=1e-6)  # 2P + 18P/N


def test_zero2_offload_keeps_only_16bit_weights_on_the_gpu_like_deepspeed():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    r = estimate(spec(offload=True))
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(r.counts.total, num_gpus_per_node=8, cpu_offload=True)
    assert r.memory["weights"] == deepspeed_gpu and r.memory["optimizer"] == 0
    assert r.host_bytes == pytest.approx(16 * r.counts.total / 8 * 8)


def test_zero3_full_model_states_by_hand():
    r = estimate(spec(zero=3))
    p, n = r.counts.total, 8
    assert r.memory["weights"] == pytest.approx(2 * p / n)
    assert r.memory["gradients_at_step"] == pytest.approx(2 * p / n + 4096 ** 2 * 2 + 4 * p / n)
    assert r.memory["transient.zero3_gathered_parameters"] == \
        128256 * 4096 * 2 * 2 + int(0.9 * 4096 ** 2) * 2  # largest module (+ its gradient) + prefetch


def test_qlora_weights_are_nf4_with_double_quantisation():
    r = estimate(spec(mode="qlora", lora_rank=16))
    c = r.counts
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert c.quantized == linear
    nf4 = linear * 0.5 + linear * (1 / 64 + 4 / 16384) + 32 * 7 * 1092
    dense = (c.total - c.lora - linear) * 2
    assert r.memory["weights"] == pytest.approx(nf4 + dense + c.lora * 2)
    assert r.memory["optimizer"] == pytest.approx(12 * c.lora / 8)


def test_lora_adapters_stay_fp32_under_zero3_only():
    z2, z3 = estimate(spec(mode="lora")), estimate(spec(mode="lora", zero=3))
    base = z2.counts.total - z2.counts.lora
    assert z2.memory["weights"] == base * 2 + z2.counts.lora * 2
    assert z3.memory["weights"] == pytest.approx((base * 2 + z3.counts.lora * 4) / 8)


# ------------------------------------------------------------------ activations

def _layer_by_hand(t, e, full=True):
    h, q, inter = L8["h"], L8["q"], L8["inter"]
    norms = 2 * ((4 + (e if full else 0) + e) * t * h + 4 * t)
    qkv = t * q * e + 2 * t * q * e  # masked SDPA repeats K/V to all 32 heads
    out_lse = t * q * e + L8["heads"] * 4096 * 4
    mask = 4096 * 4096 * e
    mlp = 4 * t * inter * e
    return norms + qkv + out_lse + mask + mlp


def test_llama3_8b_activations_by_hand_without_checkpointing():
    r = estimate(spec())
    t, e = 4096, 2
    final_norm = (4 + 2 * e) * t * 4096 + 4 * t
    expected = 32 * _layer_by_hand(t, e) + final_norm + 4 * t * 128256 + 16 * t + 2 * t * 128 * e
    assert r.memory["activations"] == expected


def test_checkpointing_keeps_2sbh_per_layer_as_korthikanti():
    r = estimate(spec(gradient_checkpointing=True))
    s, b, h, layers = 4096, 1, 4096, 32
    assert r.memory["activations.checkpointed_layer_inputs"] == 2 * s * b * h * layers
    assert r.memory["transient.recomputed_layer"] == _layer_by_hand(4096, 2)  # "plus one layer"


def test_logits_buffer_is_sequence_times_vocab_in_fp32():
    r = estimate(spec(mode="lora"))
    t, vocab = 4096, 128256
    assert r.memory["activations.logits_log_softmax_fp32"] == 4 * t * vocab
    assert r.memory["transient.logits_gradients"] == 8 * t * vocab


# ------------------------------------------------------------------ FLOPs and time

def test_flops_per_token_6n_full_4n_lora_plus_recompute():
    arch = load_architecture(LLAMA8B)
    n = count_params(arch, spec()).matmul_per_token
    n_layers = n - 128256 * 4096
    attention = 4 * 4096 * 4096 * 32  # masked: the full square
    full = flops_per_token(arch, spec(), count_params(arch, spec()), masked=True)
    assert full["total"] == 6 * n + 3 * attention
    lora_spec = spec(mode="lora", gradient_checkpointing=True)
    c = count_params(arch, lora_spec)
    lora = flops_per_token(arch, lora_spec, c, masked=True)
    assert lora["total"] == 4 * n + 3 * attention + 6 * c.lora + 2 * n_layers + attention + 2 * c.lora


def test_zero_communication_follows_nccl_bus_bandwidth():
    r = estimate(spec(mode="full", zero=2, grad_accum=2))
    p, n, busbw = r.counts.total, 8, 450e9
    expected = p * 2 * (n - 1) / n / busbw * (2 + 1)  # reduce-scatter per micro-batch + one all-gather
    assert r.timing["terms"]["comm_s"] == pytest.approx(expected)
    two_nodes = estimate(spec(mode="full", zero=2, nodes=2, interconnect="eth-100"))
    assert two_nodes.timing["comm"]["busbw_gbps"] == pytest.approx(12.5 * 0.6)


def test_zero3_gathers_every_weight_once_per_pass_by_hand():
    """ZeRO-3: each forward, backward (and recompute) pass all-gathers the whole 16-bit model; the hooks' time is
    0.65 ms per gathered module and pass: 7 linears x 32 layers + embedding + head."""
    r = estimate(spec(mode="full", zero=3, grad_accum=2, gradient_checkpointing=True))
    p, n, busbw = r.counts.total, 8, 450e9
    assert r.timing["comm"]["zero3_gather_s"] == pytest.approx(p * 2 * (n - 1) / n / busbw * 3 * 2)
    z2 = estimate(spec(mode="full", zero=2, grad_accum=2, gradient_checkpointing=True))
    fetch = 0.00065 * (7 * 32 + 2) * 3 * 2
    assert r.timing["terms"]["overhead_s"] - z2.timing["terms"]["overhead_s"] == pytest.approx(fetch, rel=1e-6)


def test_qlora_pays_the_dequantisation_of_every_nf4_weight_per_pass_by_hand():
    lora = estimate(spec(mode="lora", grad_accum=2))
    qlora = estimate(spec(mode="qlora", grad_accum=2))
    bandwidth = resolve_device("H100-80GB").hbm_tbps * 1e12
    quantized = qlora.counts.quantized
    assert quantized == L8["layers"] * (2 * L8["h"] * L8["q"] + 2 * L8["h"] * L8["kv"] + 3 * L8["h"] * L8["inter"])
    assert qlora.timing["terms"]["dequant_s"] == pytest.approx(quantized * 2.5 * 2 * 2 / bandwidth)
    assert lora.timing["terms"]["dequant_s"] == 0
    assert qlora.step_time_s > lora.step_time_s


def test_tokens_per_s_is_the_real_tokens_of_all_ranks_over_the_step_time():
    r = estimate(spec(mode="lora", grad_accum=4, micro_batch=2, packing=False))
    real_fraction = 0.6  # unpacked rows: assumed 60% real tokens
    assert r.tokens_per_s == pytest.approx(8 * 4 * 2 * 4096 * real_fraction / r.step_time_s, rel=1e-6)


def test_total_steps_follow_the_trainer_arithmetic():
    r = estimate(spec(mode="lora", examples=10000, epochs=2, micro_batch=2, grad_accum=4, packing=False))
    assert r.total_steps == 2 * (10000 // 8 // 8)
    assert r.total_time_h == pytest.approx(r.total_steps * r.step_time_s / 3600)


# ------------------------------------------------------------------ inputs and errors

def test_unknown_model_lists_the_known_ones():
    with pytest.raises(EstimateError) as error:
        load_architecture("acme/NoSuchModel-13B")
    for key in ("qwen2.5-72b", "qwen3-30b-a3b", "llama-3-70b", "gemma-2-9b", "mistral-7b"):
        assert key in str(error.value)


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(EstimateError) as error:
        resolve_device("TPU-v5")
    for name in ("V100-32GB", "A100-80GB", "H100-80GB", "H200", "L40S", "RTX-4090", "cpu"):
        assert name in str(error.value)


def test_hub_ids_and_local_directories_resolve(tiny_model_path):
    assert load_architecture("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert load_architecture("qwen2.5-7b").name == "qwen2.5-7b"
    local = load_architecture(tiny_model_path)
    assert (local.hidden_size, local.num_hidden_layers, local.num_key_value_heads) == (192, 4, 2)


def test_fp16_only_gpu_refuses_bf16():
    with pytest.raises(EstimateError, match="fp16"):
        estimate(spec(gpu="V100-32GB", precision="bf16"))
    assert estimate(spec(gpu="V100-32GB", precision="auto")).precision == "fp16"


# ------------------------------------------------------------------ verdict and alternatives

def test_a_run_that_does_not_fit_gets_ranked_alternatives_that_fit():
    r = estimate(spec(model="Qwen/Qwen2.5-32B-Instruct", mode="lora", zero=2))
    assert not r.fits
    assert "exceeds" in r.refusal and "--force" in r.refusal and "suggested fix" in r.refusal
    assert r.alternatives
    times = [a["step_time_s"] for a in r.alternatives]
    assert times == sorted(times)
    assert all(a["memory_gib"] <= r.device.memory_gib for a in r.alternatives)


def test_peak_is_the_larger_phase_and_the_breakdown_sums_to_it():
    for s in (spec(), spec(mode="lora", gradient_checkpointing=True), spec(zero=3, micro_batch=4)):
        r = estimate(s)
        assert sum(r.breakdown.values()) == pytest.approx(r.peak_bytes)


# ------------------------------------------------------------------ calibration

def test_calibration_reproduces_the_measured_step_time():
    cold = estimate(spec(mode="lora"))
    measured = cold.step_time_s * 1.7
    entry = fit_calibration(cold, measured, source="test")
    again = estimate(spec(mode="lora"), calibration={entry["key"]: entry})
    assert again.step_time_s == pytest.approx(measured)
    other = estimate(spec(mode="lora", seq_len=8192), calibration={entry["key"]: entry})
    assert other.timing["calibrated_s"] > again.step_time_s


def test_measured_step_time_skips_warm_up():
    records = [{"step": 1, "step_time_s": 9.0}, {"step": 2, "step_time_s": 5.0}] + \
              [{"step": s, "step_time_s": t} for s, t in ((3, 1.0), (4, 1.2), (5, 1.1))]
    assert measured_step_time(records) == pytest.approx(1.1)
    with pytest.raises(EstimateError, match="warm-up"):
        measured_step_time(records[:2])


def test_from_history_refits_and_saves(tmp_path, capsys):
    history = {"metadata": {"config": _tiny_config(), "world_size": 2, "device": "cpu (x86_64)",
                            "precision": "fp32", "total_steps": 50, "run_name": "t"},
               "records": [{"step": s, "step_time_s": 0.8} for s in range(1, 8)]}
    path = tmp_path / "training_history.json"
    path.write_text(json.dumps(history))
    code = _cli(["--from-history", str(path), "--json", "--calibration", str(tmp_path / "cal.json")])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["step_time_calibrated_s"] == pytest.approx(0.8, rel=1e-3)
    assert data["total_time_h"] == pytest.approx(50 * 0.8 / 3600, rel=1e-3)
    assert json.loads((tmp_path / "cal.json").read_text())["cpu/fp32"]["measured_step_time_s"] == 0.8


# ------------------------------------------------------------------ pre-flight and trainer log

def _tiny_config(**overrides):
    from train.config import load_config

    return load_config(REPO / "configs" / "tiny_lora.yaml", overrides)


def test_preflight_on_this_cpu_never_refuses_the_tiny_run(capsys):
    result = estimate_from_config(_tiny_config(), 2, 1, announce=True, calibration={})
    out = capsys.readouterr().out
    assert result.fits and result.refusal is None
    assert result.device.name == "cpu"
    assert "pre-flight estimate" in out and "GiB" in out and "s/step" in out
    out.encode("ascii")


def test_preflight_refusal_says_why_and_the_fix():
    result = estimate_from_config(_tiny_config(model="Qwen/Qwen2.5-32B-Instruct"), 8, 1, gpu="H100-80GB",
                                  calibration={})
    assert not result.fits
    assert "exceeds its" in result.refusal and "--force" in result.refusal
    result.refusal.encode("ascii")


def test_launcher_exits_4_when_it_does_not_fit_unless_forced(capsys):
    from train.launch import main

    args = ["--mode", "full", str(REPO / "configs" / "tiny_full.yaml"), "--model", "Qwen/Qwen2.5-72B-Instruct",
            "--dry-run"]
    assert main(args) == 4
    assert "exceeds" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


class _History:
    def __init__(self):
        self.data = {"metadata": {}}


def test_trainer_log_records_estimate_and_measured(capsys):
    history = _History()
    log = EstimateLog(_tiny_config(), 2, history)
    for step in range(1, 7):
        log.observe(step, {"step_time_s": 0.5 if step > 2 else 3.0})
    out = capsys.readouterr().out
    assert "estimate:" in out and "measured after warm-up" in out
    recorded = history.data["metadata"]["estimate"]
    assert recorded["measured_step_time_s"] == 0.5 and recorded["predicted_step_time_s"] > 0


# ------------------------------------------------------------------ the command line

REQUIRED_KEYS = ("params_total", "params_trainable", "memory_per_gpu_gib", "fits", "step_time_s", "tokens_per_s",
                 "total_steps", "total_time_h", "assumptions")
ISSUE_FLAGS = ["--model", "Qwen/Qwen2.5-7B-Instruct", "--mode", "lora", "--gpus-per-node", "8", "--nodes", "1",
               "--gpu", "H100-80GB", "--seq-len", "2048", "--micro-batch", "2", "--grad-accum", "4", "--zero", "2",
               "--gradient-checkpointing", "--lora-rank", "16", "--examples", "20000", "--epochs", "2"]


def _cli(argv):
    sys.path.insert(0, str(REPO / "tools"))
    import estimate_time

    return estimate_time.main(argv)


def test_cli_json_has_the_documented_keys(capsys):
    assert _cli(ISSUE_FLAGS + ["--json", "--no-calibration"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in REQUIRED_KEYS:
        assert key in data, key
    for key in ("total", "weights", "gradients", "optimizer", "activations", "other"):
        assert key in data["memory_per_gpu_gib"], key
    assert data["params_total"] == 7_615_616_512 + data["params_lora"]
    assert data["total_steps"] == 2 * (20000 // 8 // 8)
    assert isinstance(data["assumptions"], list) and len(data["assumptions"]) > 5


def test_cli_table_is_ascii_and_flags_override_the_config(capsys):
    assert _cli(["--config", str(REPO / "configs" / "tiny_lora.yaml"), "--gpu", "A100-80GB", "--gpus-per-node",
                 "4", "--zero", "3", "--offload", "--no-calibration"]) == 0
    out = capsys.readouterr().out
    out.encode("ascii")
    assert "ZeRO-3 + offload" in out and "A100-80GB" in out and "4 per node" in out


def test_cli_errors_exit_2_and_list_known_names(capsys):
    assert _cli(["--model", "nope/nope", "--gpu", "H100-80GB"]) == 2
    assert "qwen2.5-7b" in capsys.readouterr().err
    assert _cli(["--model", LLAMA8B, "--gpu", "K80"]) == 2
    assert "H100-80GB" in capsys.readouterr().err


def test_cli_answers_without_loading_torch_or_the_training_stack():
    """Why it answers in well under 2 s (0.6-0.7 s here: `time python tools/estimate_time.py ... --json`): no
    torch, DeepSpeed, peft or bitsandbytes import, whose start-up alone takes seconds."""
    probe = ("import runpy, sys; sys.argv = ['estimate_time.py'] + sys.argv[1:]; sys.path.insert(0, 'tools')\n"
             "try:\n    runpy.run_path('tools/estimate_time.py', run_name='__main__')\n"
             "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             "heavy = [m for m in ('torch', 'deepspeed', 'peft', 'bitsandbytes') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, *ISSUE_FLAGS, "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fits"] is True


def config_header_estimates():
    """(config, argv) for each `python tools/estimate_time.py ...` line in a shipped config's header comment."""
    import shlex

    found = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.startswith("#") and "python tools/estimate_time.py" in line:
                words = shlex.split(line.lstrip("# "))
                found.append((path.name, words[words.index("tools/estimate_time.py") + 1:]))
    return found


def test_every_real_config_header_gives_an_estimate_command():
    named = {name for name, _ in config_header_estimates()}
    real = {p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("tiny_")}
    assert real and real <= named, f"configs whose header has no estimate command: {sorted(real - named)}"


@pytest.mark.parametrize("name,argv", config_header_estimates(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_config_header_estimate_runs_and_fits(name, argv, capsys):
    """The command a config's header tells users to run works as written and the run fits the GPUs it names."""
    assert _cli([*argv, "--json", "--no-calibration"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True, (name, data["memory_per_gpu_gib"], data["device_memory_gib"], data["refusal"])


@pytest.mark.parametrize("name,key", [("H100", "H100-80GB"), ("h100_80gb", "H100-80GB"), ("A100", "A100-80GB"),
                                      ("RTX4090-24GB", "RTX-4090"), ("RTX 4090", "RTX-4090"), ("V100", "V100-32GB"),
                                      ("A100-40GB", "A100-40GB")])
def test_gpu_names_as_users_write_them(name, key):
    assert resolve_device(name).name == key


def test_a_memory_size_the_gpu_does_not_have_is_unknown():
    with pytest.raises(EstimateError, match="unknown GPU type 'A100-32GB'"):
        resolve_device("A100-32GB")


def test_liger_kernels_drop_the_logits_buffers_and_save_activations():
    """Measured on an H200 (Llama-3-8B shape LoRA, seq 2048, micro-batch 2, no checkpointing): 33.5 GiB reserved
    with Liger's kernels, 51.7 GiB with transformers' modules (docs/benchmarks.md)."""
    from train.estimate import RunSpec, estimate

    base = RunSpec(model="llama-3-8b", mode="lora", seq_len=2048, micro_batch=2, gradient_checkpointing=False,
                   lora_dropout=0.0, gpu="H200", margin=0.0)
    plain = estimate(base, calibration={}, with_alternatives=False)
    liger = estimate(replace(base, liger_kernel=True), calibration={}, with_alternatives=False)
    assert "activations.logits_log_softmax_fp32" in plain.memory
    assert "activations.logits_log_softmax_fp32" not in liger.memory and "transient.logits_gradients" not in liger.memory
    assert liger.memory["activations.layers"] < plain.memory["activations.layers"]
    assert abs(liger.peak_bytes / 2**30 - 33.5) / 33.5 < 0.10
    assert liger.step_time_s < plain.step_time_s
    zero3 = estimate(replace(base, liger_kernel=True, zero=3), calibration={}, with_alternatives=False)
    assert "activations.logits_log_softmax_fp32" in zero3.memory  # no fused cross-entropy under ZeRO-3


def test_liger_is_expected_on_gpus_only_when_auto():
    from train.estimate import liger_expected

    assert liger_expected({"liger_kernel": "auto"}, "H100-80GB") is True
    assert liger_expected({"liger_kernel": "auto"}, "cpu") is False
    assert liger_expected({"liger_kernel": False}, "H100-80GB") is False


def test_cli_without_a_config_follows_the_trainers_defaults(capsys):
    """No --gradient-checkpointing flag: off where the run fits without it, as gradient_checkpointing: auto does;
    Liger's kernels on GPUs, as liger_kernel: auto does."""
    common = ["--model", "meta-llama/Meta-Llama-3-8B", "--mode", "lora", "--seq-len", "2048", "--micro-batch", "2",
              "--json", "--no-calibration"]
    assert _cli(common + ["--gpu", "H200"]) == 0
    roomy = json.loads(capsys.readouterr().out)["inputs"]
    assert roomy["gradient_checkpointing"] is False and roomy["liger_kernel"] is True
    assert _cli(common + ["--gpu", "A100-40GB", "--no-liger"]) == 0
    tight = json.loads(capsys.readouterr().out)["inputs"]
    assert tight["gradient_checkpointing"] is True and tight["liger_kernel"] is False
