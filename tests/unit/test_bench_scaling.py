"""bench/scaling.py's scaling table and bench/big_runs.py's choices (layout, checkpoint room, resumes), without a
launch: what a multi-GPU session will read off them must be right before any GPU runs them."""
import json
import os

import pytest

from bench import big_runs, scaling


def case(engine, gpus, tokens_per_s=None, predicted=None):
    row = {"case": f"{engine} x{gpus}", "engine": engine, "gpus": gpus, "exit_code": 0 if tokens_per_s else 1,
           "predicted": predicted or {}, "config": {"gradient_checkpointing": False}}
    if tokens_per_s:
        row.update(tokens_per_s=tokens_per_s, step_time_s=1.0, tokens_per_s_per_gpu=tokens_per_s / gpus)
    return row


def test_scaling_is_the_two_gpu_rate_over_the_one_gpu_rate_judged_against_the_target():
    rows = [case("lora-ddp", 1, 1000.0, {"tokens_per_s": 900.0}), case("lora-ddp", 2, 1900.0, {"tokens_per_s": 1710.0}),
            case("full-fsdp2", 1, 1000.0), case("full-fsdp2", 2, 1800.0)]
    table = {t["engine"]: t for t in scaling.scaling_rows(rows, 1.85)}
    assert table["lora-ddp"]["scaling"] == pytest.approx(1.9)
    assert table["lora-ddp"]["met"] is True
    assert table["lora-ddp"]["predicted_scaling"] == pytest.approx(1.9)
    assert table["full-fsdp2"]["scaling"] == pytest.approx(1.8)
    assert table["full-fsdp2"]["met"] is False
    assert table["full-fsdp2"]["predicted_scaling"] is None


def test_an_engine_with_a_failed_or_skipped_case_has_no_scaling_and_no_verdict():
    rows = [case("full-zero3", 1, 1000.0), case("full-zero3", 2),
            {"case": "qlora-ddp x1", "engine": "qlora-ddp", "gpus": 1, "exit_code": None, "skipped": "skipped"}]
    table = {t["engine"]: t for t in scaling.scaling_rows(rows, 1.85)}
    assert table["full-zero3"]["scaling"] is None and table["full-zero3"]["met"] is None
    assert table["qlora-ddp"]["scaling"] is None and table["qlora-ddp"]["met"] is None


def test_the_table_says_missed_and_a_cpu_run_says_its_figures_mean_nothing_for_scaling():
    args = scaling.parse_args(["--steps", "5"])
    rows = [case("lora-ddp", 1, 1000.0), case("lora-ddp", 2, 1500.0)]
    text = scaling.render(rows, scaling.scaling_rows(rows, args.target), args, "cpu")
    assert "MISSED" in text and "1.50x" in text
    assert scaling.CPU_NOTE in text
    assert scaling.CPU_NOTE not in scaling.render(rows, scaling.scaling_rows(rows, args.target), args, "H100-80GB")


def test_both_gpu_counts_run_the_same_config_per_gpu(tmp_path):
    args = scaling.parse_args([])
    config = scaling.case_config(args, tmp_path / "corpus.jsonl", "full-fsdp2")
    assert (config["mode"], config["engine"], config["zero_stage"], config["model"]) == \
        ("full", "fsdp2", 3, args.full_model)
    assert (config["micro_batch_size"], config["gradient_accumulation_steps"]) == (args.micro_batch, args.grad_accum)
    assert scaling.cases_of(["lora-ddp", "qlora-ddp"]) == [("lora-ddp", 1), ("lora-ddp", 2), ("qlora-ddp", 1),
                                                           ("qlora-ddp", 2)]


def test_the_layout_is_the_first_the_estimator_says_fits():
    lora = {"mode": "lora", "zero_stage": 2}
    assert big_runs.choose_layout(lora, lambda c: True) == (lora, "as configured (the estimator: fits)")
    sharded, why = big_runs.choose_layout(lora, lambda c: c["zero_stage"] == 3)
    assert sharded == {"mode": "lora", "zero_stage": 3} and why.startswith("sharded: zero_stage 3")
    full = {"mode": "full", "zero_stage": 3}
    offloaded, why = big_runs.choose_layout(full, lambda c: c.get("offload", False))
    assert offloaded == {"mode": "full", "zero_stage": 3, "offload": True} and "(the estimator: fits)" in why
    _, why = big_runs.choose_layout(full, lambda c: False)
    assert why.startswith("sharded with CPU offload") and "none fits" in why
    assert big_runs.choose_layout({"mode": "lora", "zero_stage": 3}, lambda c: False)[1] == \
        "as configured (the estimator: none fits; run anyway)"


def test_a_case_is_the_users_config_with_the_benchmarks_changes_and_tiny_models_on_request(tmp_path):
    args = big_runs.parse_args(["--tiny", "--set", "engine=ddp"])
    config = big_runs.case_config(args, "qwen2.5-32b-lora", tmp_path / "corpus.jsonl")
    assert (config["lora_r"], config["micro_batch_size"]) == (64, 1)  # the user's
    assert (config["model"], config["max_length"], config["max_steps"]) == ("builtin:tiny-llama", 128, 4)
    assert (config["dataset"], config["eval_fraction"], config["engine"]) == (str(tmp_path / "corpus.jsonl"), 0.0,
                                                                              "ddp")
    assert "run_name" not in config
    full = big_runs.case_config(big_runs.parse_args([]), "qwen3-30b-a3b-full", tmp_path / "corpus.jsonl")
    assert (full["model"], full["max_steps"], full["mode"]) == ("random:qwen3-30b-a3b", 20, "full")


def test_a_checkpoint_bigger_than_the_free_disk_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(big_runs, "prediction", lambda *a, **k: {"params_trainable": 30_500_000_000})
    why = big_runs.checkpoint_room({}, 8, None, tmp_path)
    assert why and "30.5B trainable" in why and "GB free" in why
    monkeypatch.setattr(big_runs, "prediction", lambda *a, **k: {"params_trainable": 1000})
    assert big_runs.checkpoint_room({}, 8, None, tmp_path) is None


def test_a_resume_starts_from_the_linked_checkpoint_with_the_global_batch_kept(tmp_path, monkeypatch):
    args = big_runs.parse_args(["--steps", "4", "--work-dir", str(tmp_path)])
    step = tmp_path / "qwen2.5-32b-lora" / "run" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "state.bin").write_bytes(b"x")
    launched = []

    def fake_measure(config, out, procs, timeout):
        launched.append((procs, config["gradient_accumulation_steps"], (out / "run/checkpoints/latest").read_text(),
                         os.stat(out / "run/checkpoints/step-2/state.bin").st_nlink > 1))  # linked, not copied
        return {"exit_code": 0, "wall_s": 10.0, "steps_time_s": 4.0, "losses": {3: 2.0, 4: 1.01 * 1.9},
                "resumed_at_step": 2 if procs == 8 else None}

    monkeypatch.setattr(big_runs, "measure", fake_measure)
    saved = {"case": "qwen2.5-32b-lora", "engine": "fsdp2 (auto: ...)", "config": {"gradient_accumulation_steps": 8},
             "losses": {1: 3.0, 2: 2.5, 3: 2.0, 4: 1.9}}
    rows = big_runs.resume_runs(args, saved, 8, lambda: 100)
    assert [(r["run"], r["processes"]) for r in rows] == [("resume on 8", 8), ("resume on 4", 4)]
    assert launched == [(8, 8, "step-2\n", True), (4, 16, "step-2\n", True)]
    assert rows[0]["loss_max_rel_diff"] == pytest.approx(0.01) and rows[0]["launch_and_load_s"] == 6.0
    assert rows[0]["same_losses"] is True
    assert rows[1]["same_losses"] is False, "a run that started over has not resumed, whatever its losses"


def test_a_deepspeed_checkpoint_is_not_resumed_on_another_count(tmp_path, monkeypatch):
    args = big_runs.parse_args(["--steps", "4", "--work-dir", str(tmp_path)])
    (tmp_path / "c" / "run" / "checkpoints" / "step-2").mkdir(parents=True)
    monkeypatch.setattr(big_runs, "measure", lambda *a, **k: {"exit_code": 0, "wall_s": 1.0, "losses": {}})
    saved = {"case": "c", "engine": "deepspeed (auto: ...)", "config": {"gradient_accumulation_steps": 1}}
    rows = big_runs.resume_runs(args, saved, 2, lambda: 100)
    assert rows[0]["run"] == "resume on 2" and "skipped" not in rows[0]
    assert rows[1]["run"] == "resume on 1" and "same number of processes only" in rows[1]["skipped"]
    json.dumps(rows)  # what goes into the JSON


def test_a_run_that_wrote_no_checkpoint_is_not_resumed(tmp_path, monkeypatch):
    args = big_runs.parse_args(["--steps", "4", "--work-dir", str(tmp_path)])
    monkeypatch.setattr(big_runs, "measure", lambda *a, **k: pytest.fail("nothing to resume was launched"))
    saved = {"case": "c", "engine": "fsdp2 (auto: ...)", "config": {"gradient_accumulation_steps": 1}}
    rows = big_runs.resume_runs(args, saved, 2, lambda: 100)
    assert all("wrote no checkpoint" in row["skipped"] and "step-2" in row["skipped"] for row in rows)
