"""Chat, Alpaca and plain-text data through the real launcher; wandb in its offline mode beside tensorboard."""
import json

import pytest

from tests.conftest import (REPO, assert_ok, assert_refused_before_launch, launch_here, launcher_env, read_history,
                            run_launcher)

pytestmark = pytest.mark.slow


def test_chat_data_trains_with_wandb_offline(tmp_path):
    proc = run_launcher("train_lora.sh", "--dataset", "data/tiny_chat.jsonl", "--max_steps", "16",
                        "--eval_steps", "8", "--report_to", "wandb", "--output_dir", tmp_path,
                        "--run_name", "chat", env=launcher_env(WANDB_MODE="offline", WANDB_SILENT="true"))
    assert_ok(proc)
    history = read_history(tmp_path / "chat")
    assert history["metadata"]["data"]["format"] == "chat"
    assert history["evals"][-1]["eval_loss"] < history["evals"][0]["eval_loss"]
    assert list((tmp_path / "chat" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((tmp_path / "chat" / "tensorboard").glob("events.out.tfevents.*"))


def test_alpaca_trains_and_truncation_is_reported_and_recorded(tmp_path):
    """Alpaca fields (instruction, input, output), and a max_length that truncates most responses and leaves some
    examples with no response token: counted at start, kept in the history, and the run still trains."""
    alpaca = tmp_path / "alpaca.jsonl"
    with open(REPO / "data" / "tiny_instruct.jsonl", encoding="utf-8") as src, open(alpaca, "w") as dst:
        for line in src:
            example = json.loads(line)
            dst.write(json.dumps({"instruction": example["instruction"], "input": example["context"],
                                  "output": example["response"]}) + "\n")
    proc = run_launcher("train_lora.sh", "--dataset", alpaca, "--max_length", "28", "--max_steps", "6",
                        "--eval_steps", "6", "--output_dir", tmp_path, "--run_name", "alpaca")
    assert_ok(proc)
    data = read_history(tmp_path / "alpaca")["metadata"]["data"]
    assert data["format"] == "alpaca" and data["truncated"] > 0 and data["dropped_no_response"] > 0, data
    assert data["train_examples"] + data["eval_examples"] + data["dropped_no_response"] == data["examples"]
    assert (f"max_length 28: {data['truncated']} examples lost response tokens to truncation, "
            f"{data['dropped_no_response']} had no response token left and were dropped") in proc.stderr


def test_missing_wandb_or_bad_field_names_fail_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    proc = run_launcher("train_lora.sh", "--dataset", bad, "--output_dir", tmp_path, "--no-preflight")
    assert proc.returncode == 2
    assert "bad.jsonl: line 1 has fields ['answer', 'question']" in proc.stderr


@pytest.mark.parametrize("data", ["train.jsonl", "train_trl.jsonl"])
def test_a_vision_language_file_for_a_text_model_is_refused_naming_the_image_rows(tmp_path, capsys, data):
    """LLaMA-Factory's <image> + `images` rows and TRL's image items, given to a text-only model: refused before
    launch (the model would read <image> as text and never see a picture), naming the model, the first image row,
    how many there are, and what to use instead."""
    path = REPO / "data" / "tiny_vl" / data
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    pictured = [number for number, row in enumerate(rows, start=1) if row.get("images") or "image" in json.dumps(
        [item for m in row["messages"] if isinstance(m["content"], list) for item in m["content"]])]
    proc = launch_here(capsys, "--model", "builtin:tiny-llama", "--dataset", path, "--output_dir", tmp_path)
    assert_refused_before_launch(proc, f"{path}:{pictured[0]}: ", f"{len(pictured)} of the {len(rows)} rows have "
                                 f"images", "builtin:tiny-llama is a text-only model",
                                 "image-text-to-text model (e.g. model: builtin:tiny-qwen3-vl)", "remove the images")
