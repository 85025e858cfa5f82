import json

import pytest

from finetune_launcher.config import RunConfig
from finetune_launcher.data.prompts import render_instruction_prompt
from finetune_launcher.data.records import DataError, detect_format
from finetune_launcher.data.text import (IGNORE_INDEX, Example, collate, make_rows, pack_examples, prepare_data,
                                         tokenize_chat, tokenize_instructions)


def config_for(path, **extra):
    return RunConfig(mode="lora", model="builtin:tiny-llama", dataset=str(path), **extra)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_tokens_are_masked_and_response_tokens_supervised(tiny_tokenizer):
    record = {"instruction": "Reverse the order of the words.", "context": "red blue", "response": "blue red"}
    example, = tokenize_instructions([record], "dolly", tiny_tokenizer)
    prompt_len = len(tiny_tokenizer(render_instruction_prompt(record["instruction"], record["context"]),
                                    add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE_INDEX for t in example.labels[:prompt_len])
    response = example.labels[prompt_len:]
    assert response == example.input_ids[prompt_len:]
    assert tiny_tokenizer.decode(response[:-1]) == "blue red" and response[-1] == tiny_tokenizer.eos_token_id


def test_alpaca_and_dolly_fields_are_detected():
    assert detect_format({"instruction": "a", "input": "", "output": "b"}, "f") == "alpaca"
    assert detect_format({"instruction": "a", "context": "", "response": "b"}, "f") == "dolly"
    assert detect_format({"messages": []}, "f") == "chat"
    with pytest.raises(DataError, match=r"fields \['prompt', 'reply'\].*instruction"):
        detect_format({"prompt": "a", "reply": "b"}, "f")


def test_malformed_line_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "context": "", "response": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        prepare_data(config_for(path), tiny_tokenizer)


def test_every_bad_line_is_counted_and_the_first_is_named(tmp_path, tiny_tokenizer):
    """A malformed line 9 and a missing field on lines 3 and 6: the error names line 3 first, and the others."""
    good = json.dumps({"instruction": "a", "response": "b"})
    lines = [good] * 10
    lines[2] = lines[5] = json.dumps({"instruction": "a"})
    lines[8] = '{"instruction": oops}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        prepare_data(config_for(path), tiny_tokenizer)
    assert str(error.value).startswith(f"{path}:3: missing field(s) ['response']")
    assert str(error.value).endswith(f"[the first of 3 bad lines in {path}; also line(s) 6, 9]")


def test_missing_field_names_line_and_expected_fields(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}] * 3 + [{"instruction": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:4: missing field\(s\) \['response'\]"):
        prepare_data(config_for(path), tiny_tokenizer)


def test_prompts_longer_than_max_length_stop_before_training_with_the_cause(tmp_path, tiny_tokenizer):
    records = [{"instruction": "word " * 80, "context": "", "response": "short"}] * 20
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.raises(DataError, match="no example has a supervised token.*max_length=32"):
        prepare_data(config_for(path, max_length=32), tiny_tokenizer)


def test_truncation_is_counted(tmp_path, tiny_tokenizer):
    records = [{"instruction": "Say it.", "context": "", "response": "red " * 60}] * 10 + \
              [{"instruction": "Say it.", "context": "", "response": "ok"}] * 10
    data = prepare_data(config_for(write_jsonl(tmp_path / "t.jsonl", records), max_length=48, eval_fraction=0),
                        tiny_tokenizer)
    assert data.stats["truncated"] == 10 and data.stats["dropped_no_response"] == 0


def test_packing_keeps_every_example_and_respects_capacity():
    examples = [Example(list(range(n)), list(range(n))) for n in (5, 9, 3, 7, 2, 8, 1, 6)]
    bins = pack_examples(examples, 10)
    assert sorted(len(e.input_ids) for b in bins for e in b) == sorted(len(e.input_ids) for e in examples)
    assert all(sum(len(e.input_ids) for e in b) <= 10 for b in bins)
    assert len(bins) == 5  # 41 tokens need at least 5 bins of 10


def test_packed_rows_restart_positions_and_mask_each_examples_first_token():
    rows = make_rows([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5])], 8, packing=True)
    assert len(rows) == 1
    row = rows[0]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"][3] == IGNORE_INDEX  # never predict example 2's first token from example 1
    batch = collate(rows, pad_id=0, packed=True)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_shipped_data_packs_to_at_least_95_percent_non_pad(tiny_tokenizer):
    from tests.conftest import REPO

    data = prepare_data(config_for(REPO / "data" / "tiny_instruct.jsonl", max_length=256), tiny_tokenizer)
    assert data.stats["nonpad_fraction"] >= 0.95


def test_chat_loss_covers_assistant_turns_only(tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]}
    example = tokenize_chat(record, tiny_tokenizer)
    supervised = tiny_tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert "hello" in supervised and "yes" in supervised
    assert "hi there" not in supervised and "again" not in supervised and "<|user|>" not in supervised
    full = tiny_tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == full


def test_plain_text_is_cut_into_full_blocks_with_every_token_supervised(tiny_tokenizer):
    """Text records are concatenated (EOS between documents) and cut into max_length blocks, unpacked: every row is
    full and every token is a label."""
    from tests.conftest import REPO

    data = prepare_data(config_for(REPO / "data" / "tiny_text.jsonl", max_length=64, eval_fraction=0.1),
                        tiny_tokenizer)
    assert data.stats["format"] == "text" and not data.extras["packed"] and data.train_rows
    for row in data.train_rows + data.eval_rows:
        assert len(row["input_ids"]) == 64 and row["labels"][1:] == row["input_ids"][1:]
