"""The estimator's interfaces: the CLI's flags and JSON, errors that list what is known, the run-config mapping
(auto settings, a resolved DeepSpeed dict), the pre-flight and its refusal, the trainer's log, the calibration
file. The figures themselves are checked against independent references in test_estimate_counts.py,
test_estimate_states.py, test_estimate_benchmarks.py and tests/e2e/test_estimate_*.py."""
import json
import subprocess
import sys
from types import MappingProxyType

import pytest

from tests.conftest import REPO
from finetune_launcher.estimate import (EstimateError, EstimateLog, RunSpec, estimate, estimate_from_config,
                                        load_architecture, measured_step_time, resolve_device, spec_from_config)
from finetune_launcher.estimate.cli import main as estimate_command

LLAMA8B = "meta-llama/Meta-Llama-3-8B-Instruct"


def spec(**kw):
    base = dict(model=LLAMA8B, mode="full", procs_per_node=8, gpu="H100-80GB", max_length=4096, micro_batch_size=1,
                zero_stage=2, gradient_checkpointing=False, precision="bf16", lora_dropout=0.0)
    base.update(kw)
    return RunSpec(**base)


# ------------------------------------------------------------------ total steps

def test_total_steps_follow_the_trainer_arithmetic():
    r = estimate(spec(mode="lora", examples=10000, num_epochs=2, micro_batch_size=2, gradient_accumulation_steps=4,
                      packing=False))
    assert r.total_steps == 2 * (10000 // 8 // 8)
    assert r.total_time_h == pytest.approx(r.total_steps * r.step_time_s / 3600)


def test_host_memory_holds_a_model_loaded_whole_once_per_rank_that_loads_it():
    """Before sharding, the whole 16-bit model sits in host memory where a rank loads it: under FSDP2 rank 0 alone
    (the others build it on the meta device), under ZeRO-3 QLoRA every rank (4-bit, quantised as it loads)."""
    fsdp2 = estimate(spec(zero_stage=3, engine="fsdp2"))
    weights_gib = fsdp2.counts.total * 2 / 2**30
    assert fsdp2.host_bytes / 2**30 == pytest.approx(weights_gib, rel=0.01), "once per node, not once per rank"
    one_process = estimate(spec(zero_stage=3, engine="fsdp2", procs_per_node=1))
    assert one_process.host_bytes == pytest.approx(fsdp2.host_bytes), "8 processes hold what one does"
    qlora, qlora_one = (estimate(spec(zero_stage=3, mode="qlora", procs_per_node=n)) for n in (8, 1))
    assert qlora.host_bytes == pytest.approx(8 * qlora_one.host_bytes), "every QLoRA rank holds its own 4-bit copy"
    assert qlora_one.host_bytes < fsdp2.host_bytes / 2, "in 4 bits"


def test_a_run_whose_host_memory_cannot_fit_the_machine_is_refused_before_launch():
    """ZeRO-3 QLoRA of a 32B model on 8 H100s: each rank loads the 4-bit model whole before DeepSpeed partitions it
    (about 8 x 18 GB on the node); a 128 GiB node cannot hold that, a 1 TiB one can; FSDP2 with 16-bit weights,
    loaded by rank 0 alone, fits the 128 GiB node; a `random:` shape is built on the GPUs and loads nothing."""
    from finetune_launcher.launch.preflight import host_memory_refusal

    qlora = estimate(spec(model="Qwen/Qwen2.5-32B-Instruct", mode="qlora", zero_stage=3))
    refusal = host_memory_refusal(qlora, total_bytes=128 * 2**30)
    assert refusal and "host memory per node" in refusal and "--force" in refusal, refusal
    refusal.encode("ascii")
    assert host_memory_refusal(qlora, total_bytes=2**40) is None
    lora = estimate(spec(model="Qwen/Qwen2.5-32B-Instruct", mode="lora", zero_stage=3, engine="fsdp2"))
    assert host_memory_refusal(lora, total_bytes=128 * 2**30) is None
    random_shape = estimate(spec(model="random:qwen2.5-32b", mode="qlora", zero_stage=3))
    assert random_shape.host_bytes == 0 and host_memory_refusal(random_shape, total_bytes=16 * 2**30) is None


def test_compiled_moe_layers_keep_the_eager_experts_host_time():
    """compile_layers on a mixture of experts leaves the experts eager: where a step's compute is short (seq 256)
    their host time shows in the overhead, and it grows with the layers x passes x micro-batches it repeats for; a
    dense model's compiled layers cost only the per-step constant."""
    from finetune_launcher.estimate.step_time import STEP_OVERHEAD_S

    def overhead(model, accumulation):
        return estimate(spec(model=model, mode="lora", procs_per_node=1, gpu="H200", max_length=256,
                             gradient_accumulation_steps=accumulation, compile_layers=True, engine="ddp",
                             liger_kernel=False)).timing["terms"]["overhead_s"]

    assert overhead("Qwen/Qwen2.5-7B-Instruct", 4) == pytest.approx(STEP_OVERHEAD_S["gpu"])
    moe, moe_longer = overhead("random:qwen3-30b-a3b", 4), overhead("random:qwen3-30b-a3b", 8)
    assert moe > STEP_OVERHEAD_S["gpu"] + 0.05
    assert moe_longer - STEP_OVERHEAD_S["gpu"] > 1.5 * (moe - STEP_OVERHEAD_S["gpu"])


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
    assert estimate(spec(gpu="V100-32GB", precision="fp16")).precision == "fp16"


def test_precision_auto_is_left_to_the_config_resolution():
    with pytest.raises(EstimateError, match="'auto' is decided when the run config is resolved"):
        estimate(spec(precision="auto"))


# ------------------------------------------------------------------ verdict and alternatives

def test_a_run_that_does_not_fit_gets_ranked_alternatives_that_fit():
    r = estimate(spec(model="Qwen/Qwen2.5-32B-Instruct", mode="lora", zero_stage=2))
    assert not r.fits
    assert "exceeds" in r.refusal and "--force" in r.refusal and "suggested fix" in r.refusal
    assert r.alternatives
    times = [a["step_time_s"] for a in r.alternatives]
    assert times == sorted(times)
    assert all(a["memory_gib"] <= r.device.memory_gib for a in r.alternatives)


# ------------------------------------------------------------------ calibration

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
    assert data["calibration"]["key"] == "cpu/fp32" and data["step_time_calibrated_s"] is not None
    saved = json.loads((tmp_path / "cal.json").read_text())["cpu/fp32"]
    assert saved["measured_step_time_s"] == 0.8 and saved["source"] == "t" and saved["factor"] > 0
    assert {"device", "precision", "mode", "cold_step_time_s", "spec"} <= set(saved)


# ------------------------------------------------------------------ pre-flight and trainer log

def _tiny_config(**overrides):
    """The tiny default's resolved run config as the estimator receives it (a plain mapping)."""
    from tests.conftest import resolve

    return resolve(REPO / "configs" / "tiny_lora.yaml", overrides, require_model=False).as_dict()


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
    from finetune_launcher.launch.cli import main

    args = ["--mode", "full", str(REPO / "configs" / "tiny_full.yaml"), "--model", "random:qwen2.5-72b",
            "--dry-run"]
    assert main(args) == 4
    assert "exceeds" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


# ------------------------------------------------------------------ the run-config mapping

def test_spec_takes_each_run_config_key_by_its_own_name():
    """Every RunSpec field named as a run-config key holds that key's resolved value; the machine comes from the
    caller."""
    from dataclasses import fields

    config = _tiny_config(max_length=96, micro_batch_size=3, gradient_accumulation_steps=5, zero_stage=3, lora_r=4,
                          lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.0, num_epochs=3, max_steps=7,
                          packing=False, attn_implementation="eager", overlap_comm=True, zero3_gather="module")
    made = spec_from_config(MappingProxyType(config), 2, 1, gpu="cpu")
    shared = [f.name for f in fields(RunSpec) if f.name in config and f.name not in ("gpu", "procs_per_node")]
    assert len(shared) > 20
    for name in shared:
        assert getattr(made, name) == config[name], name


def test_the_resolved_decisions_are_taken_as_given_and_auto_is_refused():
    """Gradient checkpointing and Liger's kernels are what the config resolution decided, even where the run would
    fit without checkpointing and the GPU could run Liger's kernels; an unresolved `auto` is refused."""
    config = dict(_tiny_config(), gradient_checkpointing=True, liger_kernel=False)
    given = spec_from_config(MappingProxyType(config), 8, 1, gpu="H100-80GB")
    assert given.gradient_checkpointing is True and given.liger_kernel is False
    for key in ("gradient_checkpointing", "liger_kernel", "precision"):
        with pytest.raises(EstimateError, match=f"not resolved \\({key}: auto\\)"):
            spec_from_config(dict(config, **{key: "auto"}), 8, 1, gpu="H100-80GB")


def test_a_resolved_deepspeed_dict_in_the_mapping_gives_the_bucket_and_overlap(tmp_path):
    """Under `deepspeed` the resolved DeepSpeed dict is used as is; the file named by deepspeed_config is not read
    again (here it does not exist)."""
    zero = {"stage": 2, "reduce_bucket_size": 5e8, "overlap_comm": True}
    config = dict(_tiny_config(), deepspeed={"zero_optimization": zero}, deepspeed_config=str(tmp_path / "gone.json"))
    spec = spec_from_config(MappingProxyType(config), 2, 1, gpu="cpu")
    assert (spec.reduce_bucket_size, spec.overlap_comm) == (500_000_000, True)
    result = estimate(spec, calibration={}, with_alternatives=False)
    assert result.memory["gradients"] >= 2 * 5e8 * 4  # two fp32 buckets of 5e8 elements with overlap_comm


def test_a_users_deepspeed_file_gives_its_numbers(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000,
                                                      "stage3_max_live_parameters": 12345, "overlap_comm": "auto"}}))
    spec = spec_from_config(_tiny_config(deepspeed_config=str(path)), 2, 1, gpu="cpu")
    assert (spec.reduce_bucket_size, spec.stage3_max_live_parameters, spec.overlap_comm) == (1000, 12345, False)


def test_a_peer_files_unprefixed_zero3_names_give_their_numbers(tmp_path):
    """axolotl writes max_live_parameters without the stage3_ prefix; the estimate reads it all the same."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "max_live_parameters": 12345}}))
    spec = spec_from_config(_tiny_config(deepspeed_config=str(path)), 2, 1, gpu="cpu")
    assert spec.stage3_max_live_parameters == 12345


class _History:
    def __init__(self):
        self.data = {"metadata": {}}


def test_trainer_log_records_estimate_and_measured(capsys):
    history = _History()
    log = EstimateLog(MappingProxyType(dict(_tiny_config())), 2, history)
    for step in range(1, 7):
        log.observe(step, {"step_time_s": 0.5 if step > 2 else 3.0})
    out = capsys.readouterr().out
    assert "estimate:" in out and "measured after warm-up" in out
    recorded = history.data["metadata"]["estimate"]
    assert recorded["measured_step_time_s"] == 0.5 and recorded["predicted_step_time_s"] > 0


# ------------------------------------------------------------------ the command line

REQUIRED_KEYS = ("params_base", "params_adapter", "params_trainable", "memory_per_gpu_gib", "fits", "step_time_s",
                 "tokens_per_s", "total_steps", "total_time_h", "assumptions")
ISSUE_FLAGS = ["--model", "Qwen/Qwen2.5-7B-Instruct", "--mode", "lora", "--gpus-per-node", "8", "--nodes", "1",
               "--gpu", "H100-80GB", "--seq-len", "2048", "--micro-batch", "2", "--grad-accum", "4", "--zero", "2",
               "--gradient-checkpointing", "--lora-rank", "16", "--examples", "20000", "--epochs", "2"]


def _cli(argv):
    return estimate_command(argv)


def test_cli_json_has_the_documented_keys(capsys):
    assert _cli(ISSUE_FLAGS + ["--json", "--no-calibration"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in REQUIRED_KEYS:
        assert key in data, key
    for key in ("total", "weights", "gradients", "optimizer", "activations", "other"):
        assert key in data["memory_per_gpu_gib"], key
    assert data["params_base"] == 7_615_616_512 and data["params_adapter"] == data["params_trainable"] > 0
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


def test_the_estimate_of_a_resolved_config_loads_no_torch(tmp_path):
    """The launcher's pre-flight for a model of the offline table imports no torch, DeepSpeed, peft or
    bitsandbytes (whose start-up alone takes seconds): the resolved config is read as written."""
    config = _tiny_config(model="Qwen/Qwen2.5-7B-Instruct")
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(config))
    probe = ("import json, sys\nfrom finetune_launcher.estimate import estimate_from_config\n"
             "result = estimate_from_config(json.load(open(sys.argv[1])), 8, 1, gpu='H100-80GB', calibration={})\n"
             "heavy = [m for m in ('torch', 'deepspeed', 'peft', 'bitsandbytes') if m in sys.modules]\n"
             "print('HEAVY', heavy, result.fits)")
    proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_the_tools_script_runs_the_estimate_command():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_time.py"), *ISSUE_FLAGS, "--json",
                           "--no-calibration"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["params_base"] == 7_615_616_512


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


def test_cli_without_a_config_follows_the_trainers_defaults(capsys):
    """No --gradient-checkpointing flag: the run config's gradient_checkpointing: auto, resolved as for a launch
    (off where the run fits without it); Liger's kernels on GPUs, as liger_kernel: auto resolves."""
    common = ["--model", "meta-llama/Meta-Llama-3-8B", "--mode", "lora", "--seq-len", "2048", "--micro-batch", "2",
              "--json", "--no-calibration"]
    assert _cli(common + ["--gpu", "H200"]) == 0
    roomy = json.loads(capsys.readouterr().out)["inputs"]
    assert roomy["gradient_checkpointing"] is False and roomy["liger_kernel"] is True
    assert _cli(common + ["--gpu", "A100-40GB", "--no-liger"]) == 0
    tight = json.loads(capsys.readouterr().out)["inputs"]
    assert tight["gradient_checkpointing"] is True and tight["liger_kernel"] is False
