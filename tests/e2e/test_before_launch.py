"""Mistakes are found by the launcher before torchrun starts: one message naming the file, key or line and the fix,
exit 2, no torchrun failure report and no traceback. A run with changed settings never silently continues an old
checkpoint."""
import json

import pytest

from tests.conftest import REPO, assert_ok, assert_refused_before_launch, launch_here, read_history, run_launcher

pytestmark = pytest.mark.slow


def lines_of(path, records):
    path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in records))
    return path


def tiny_records(n):
    with open(REPO / "data" / "tiny_instruct.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_a_malformed_jsonl_line_is_named(tmp_path):
    data = lines_of(tmp_path / "bad.jsonl", tiny_records(3) + ['{"instruction": "x", "response": '])
    assert_refused_before_launch(run_launcher("train_lora.sh", "--dataset", data, "--output_dir", tmp_path),
                                 f"{data}:4: malformed JSON")


def test_all_labels_masked_is_named_with_the_fix(tmp_path, capsys):
    proc = launch_here(capsys, "--max_length", "8", "--output_dir", tmp_path)
    assert_refused_before_launch(proc, "no example has a supervised token left", "raise max_length")


def test_a_dataset_smaller_than_one_step_is_named(tmp_path, capsys):
    data = lines_of(tmp_path / "few.jsonl", tiny_records(12))
    proc = launch_here(capsys, "--dataset", data, "--packing", "false", "--eval_fraction", "0",
                        "--micro_batch_size", "4", "--gradient_accumulation_steps", "2", "--output_dir", tmp_path)
    assert_refused_before_launch(proc, "12 training rows, fewer than one optimizer step needs",
                                 "2 processes x micro_batch_size 4 x gradient_accumulation_steps 2 = 16")


def test_a_packed_dataset_smaller_than_one_step_names_packing_and_the_rows_needed(tmp_path, capsys):
    """Packing puts these 6 short examples into one row: a smaller micro-batch cannot help, so the message names
    packing and what would make the step fit."""
    data = lines_of(tmp_path / "few.jsonl", tiny_records(6))
    proc = launch_here(capsys, "--dataset", data, "--eval_fraction", "0", "--micro_batch_size", "1",
                       "--output_dir", tmp_path)
    assert_refused_before_launch(proc, "1 training rows, fewer than one optimizer step needs",
                                 "packing put 6 examples into 1 rows", "set packing: false (one example a row: 6 rows)")


def test_a_deepspeed_file_contradicting_the_config_is_named(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    proc = launch_here(capsys, "--deepspeed", ds, "--zero", "2", "--output_dir", tmp_path)
    assert_refused_before_launch(proc, f"{ds} gives zero_stage 3 but the command line also sets zero_stage: 2")


@pytest.mark.parametrize("args,needle", [
    (["--model", "builtin:typo"], "key 'model': unknown builtin model 'typo'; known: builtin:small-llama"),
    (["--model", "random:unknown"], "key 'model': unknown architecture 'unknown' for random:"),
    (["--liger_kernel", "true"], "key 'liger_kernel': true, but Liger's kernels are Triton kernels and need a CUDA"),
    (["--lora_rank", "8"], "unknown key 'lora_rank' (did you mean 'lora_r'?)"),
])
def test_bad_names_and_impossible_choices_are_named(tmp_path, capsys, args, needle):
    assert_refused_before_launch(launch_here(capsys, *args, "--output_dir", tmp_path), needle)


# ---------------------------------------------------------------- resume that cannot surprise

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    proc = run_launcher("train_lora.sh", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3",
                        "--output_dir", out, "--run_name", "old")
    assert_ok(proc)
    return out


def test_changed_training_settings_are_refused_naming_each_difference(finished_run, tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    proc = run_launcher("train_lora.sh", "--deepspeed", ds, "--max_steps", "12", "--lora_r", "8",
                        "--output_dir", finished_run, "--run_name", "old")
    assert_refused_before_launch(proc, "trained with other settings than this run",
                                 "lora_r: 16 in the checkpoint, 8 now", "zero_stage: 2 in the checkpoint, 3 now",
                                 "--resume never", "--run_name", "--resume always")
    assert read_history(finished_run / "old")["status"] == "completed"  # the old run is untouched


def test_max_steps_at_or_below_the_checkpoint_says_there_is_nothing_to_train(finished_run, capsys):
    for steps, words in (("4", "max_steps 4 is below it"), ("6", "it already finished")):
        proc = launch_here(capsys, "--max_steps", steps, "--save_steps", "3", "--eval_steps", "3",
                            "--output_dir", finished_run, "--run_name", "old")
        assert_refused_before_launch(proc, "checkpoints/step-6 is at step 6", words, "nothing to train")


def test_a_run_stopped_while_saving_its_last_step_is_finished_on_resume(finished_run, tmp_path):
    """Killed or requeued after checkpoints/step-6 of 6 but before final/ and the completed history: the same
    command finishes it (final/ written, history completed), where a finished run would be refused."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(finished_run / "old", run)
    shutil.rmtree(run / "final")
    history = read_history(run)
    history["status"] = "running"
    (run / "training_history.json").write_text(json.dumps(history))
    proc = run_launcher("train_lora.sh", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3",
                        "--output_dir", tmp_path, "--run_name", "old")
    assert_ok(proc)
    assert f"resumed from {run / 'checkpoints' / 'step-6'} at step 6" in proc.stdout
    assert "training 0 steps" in proc.stdout
    finished = read_history(run)
    assert finished["status"] == "completed" and [r["step"] for r in finished["records"]][-1] == 6
    assert (run / "final" / "adapter_model.safetensors").stat().st_size > 0


def test_resume_always_continues_a_changed_run_and_says_so(finished_run):
    proc = run_launcher("train_lora.sh", "--max_steps", "8", "--save_steps", "3", "--eval_steps", "3",
                        "--learning_rate", "1e-3", "--resume", "always", "--output_dir", finished_run,
                        "--run_name", "old")
    assert_ok(proc)
    assert "learning_rate: 0.003 in the checkpoint, 0.001 now" in proc.stderr and "continuing anyway" in proc.stderr
    history = read_history(finished_run / "old")
    assert history["metadata"]["resumed_at_steps"] == [6] and max(r["step"] for r in history["records"]) == 8


def test_resume_always_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    proc = launch_here(capsys, "--resume", "always", "--max_steps", "4", "--output_dir", tmp_path,
                        "--run_name", "fresh")
    assert_refused_before_launch(proc, f"no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}")
