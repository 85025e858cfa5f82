"""Chat and plain-text data through the real launcher; wandb in its offline mode beside tensorboard."""
import pytest

from tests.conftest import assert_ok, launcher_env, read_history, run_launcher

pytestmark = pytest.mark.slow


def test_chat_data_trains_with_wandb_offline(tmp_path):
    proc = run_launcher("train_lora.sh", "--dataset", "data/tiny_chat.jsonl", "--max_steps", "16",
                        "--eval_steps", "8", "--report_to", "tensorboard,wandb", "--output_dir", tmp_path,
                        "--run_name", "chat", env=launcher_env(WANDB_MODE="offline", WANDB_SILENT="true"))
    assert_ok(proc)
    history = read_history(tmp_path / "chat")
    assert history["metadata"]["data"]["format"] == "chat"
    assert history["evals"][-1]["eval_loss"] < history["evals"][0]["eval_loss"]
    assert list((tmp_path / "chat" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((tmp_path / "chat" / "tensorboard").glob("events.out.tfevents.*"))


def test_plain_text_is_cut_into_full_blocks(tmp_path):
    proc = run_launcher("train_full.sh", "--dataset", "data/tiny_text.jsonl", "--max_length", "128",
                        "--max_steps", "12", "--eval_steps", "6", "--output_dir", tmp_path, "--run_name", "text")
    assert_ok(proc)
    history = read_history(tmp_path / "text")
    assert history["metadata"]["data"]["format"] == "text"
    assert all(r["nonpad_fraction"] == 1.0 for r in history["records"])
    assert history["evals"][-1]["eval_loss"] < 0.8 * history["evals"][0]["eval_loss"]


def test_missing_wandb_or_bad_field_names_fail_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    proc = run_launcher("train_lora.sh", "--dataset", bad, "--output_dir", tmp_path, "--no-preflight")
    assert proc.returncode == 2
    assert "bad.jsonl: line 1 has fields ['answer', 'question']" in proc.stderr
