"""Parameter counts and FLOPs against transformers itself: every table entry against the model transformers builds
on the meta device, real-format config.json files (Gemma-2's tied default, Qwen-VL's vision tower, an MoE),
peft's LoRA counts, and torch's FlopCounterMode on a real forward and backward."""
import json
from dataclasses import replace

import pytest
import torch

from finetune_launcher.estimate import (EstimateError, RunSpec, architecture_from_table, base_counts_from_shapes,
                            count_params, flops_per_token, load_architecture)
from finetune_launcher.models.arch_table import ARCHITECTURES, PUBLISHED_PARAMS
from finetune_launcher.estimate.meta_model import describe_meta_model
from finetune_launcher.models.references import random_shape_config

# google/gemma-2-2b's config.json as published (no tie_word_embeddings: transformers' Gemma2Config defaults it to
# true), with the model card's count: 2,614,341,888 parameters.
GEMMA_2_2B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000}
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, head_dim=16)
VL_CONFIGS = {
    "qwen2_5_vl": dict(text_config=TINY_TEXT, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64,
                                                                 num_heads=2, out_hidden_size=64, patch_size=14,
                                                                 spatial_merge_size=2)),
    "qwen3_vl": dict(text_config=TINY_TEXT, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64,
                                                               num_heads=2, out_hidden_size=64, patch_size=16,
                                                               spatial_merge_size=2, deepstack_visual_indexes=[1])),
}


def meta_model(config, auto_class=None):
    import transformers

    auto_class = auto_class or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(config)


def numel(parameters):
    return sum(p.numel() for p in parameters)


def write_config(directory, config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_table_counts_equal_the_meta_device_model(key):
    """The torch-free formula of the table path gives what transformers builds: total, embedding, output head,
    the nn.Linear weights bitsandbytes quantises, the weights multiplied per token, the largest module."""
    model = meta_model(random_shape_config(key))
    ours = base_counts_from_shapes(architecture_from_table(key))
    assert ours.total == numel(model.parameters())
    assert ours.embedding == model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    assert ours.lm_head == (0 if head is model.get_input_embeddings().weight else head.numel())
    linears = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not head]
    assert sorted(ours.linear_sizes) == sorted(linears)
    assert ours.largest_module == max(numel(m.parameters(recurse=False)) for m in model.modules())
    from_model = describe_meta_model(random_shape_config(key), architecture_from_table(key), key)["counts"]
    assert ours.matmul_per_token == from_model.matmul_per_token


@pytest.mark.parametrize("key", sorted(PUBLISHED_PARAMS))
def test_table_counts_equal_the_published_counts(key):
    assert count_params(architecture_from_table(key), RunSpec(model=key, mode="full")).total == PUBLISHED_PARAMS[key]


def test_gemma_2_2b_config_without_tie_key_counts_2_61b(tmp_path):
    arch = load_architecture(str(write_config(tmp_path / "gemma-2-2b", GEMMA_2_2B_CONFIG)))
    counts = count_params(arch, RunSpec(model="gemma", mode="full"))
    assert counts.total == 2_614_341_888
    assert arch.tie_word_embeddings and counts.lm_head == 0
    assert (arch.norms_per_layer, arch.final_logit_softcap, arch.head_dim) == (4, True, 256)


@pytest.mark.parametrize("model_type", sorted(VL_CONFIGS))
def test_vision_language_config_counts_the_vision_tower_apart(model_type, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(model_type, **VL_CONFIGS[model_type])
    config.save_pretrained(tmp_path / model_type)
    arch = load_architecture(str(tmp_path / model_type))
    model = meta_model(config, AutoModelForImageTextToText)
    counts = count_params(arch, RunSpec(model=model_type, mode="full"))
    assert counts.total == numel(model.parameters())
    assert arch.vision_params == counts.vision == numel(model.model.visual.parameters()) > 0
    assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size) == (64, 2, 1000)  # from text_config


def test_moe_config_counts_all_experts_and_multiplies_the_active_ones(tmp_path):
    """Memory holds every expert; a token multiplies the attention, the router, its 2 of 8 experts and the head."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_moe", **TINY_TEXT, num_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=32, decoder_sparse_step=1, tie_word_embeddings=False)
    config.save_pretrained(tmp_path / "moe")
    arch = load_architecture(str(tmp_path / "moe"))
    model = meta_model(config)
    counts = count_params(arch, RunSpec(model="moe", mode="full"))
    assert counts.total == numel(model.parameters())
    layers = model.model.layers
    experts = numel(p for n, p in layers.named_parameters() if ".experts." in n)
    others = numel(p for n, p in layers.named_parameters() if ".experts." not in n and p.dim() == 2)
    assert counts.matmul_per_token == others + experts * 2 // 8 + model.lm_head.weight.numel()


def test_a_config_transformers_cannot_read_names_the_file(tmp_path):
    directory = write_config(tmp_path / "odd", {"model_type": "no_such_model", "hidden_size": 8})
    with pytest.raises(EstimateError, match="config.json"):
        load_architecture(str(directory))


def test_random_unknown_is_an_estimate_error_naming_the_known_architectures():
    with pytest.raises(EstimateError) as error:
        load_architecture("random:unknown")
    assert "llama-3-8b" in str(error.value) and "qwen3-30b-a3b" in str(error.value)


@pytest.mark.parametrize("key,targets", [("llama-3-8b", "all-linear"), ("llama-3-8b", ["q_proj", "v_proj"]),
                                         ("qwen3-30b-a3b", "all-linear")])
def test_lora_counts_equal_peft(key, targets):
    """peft's LoRA on the targets as the trainer gives them (an MoE: the experts' fused weights through
    target_parameters, the router frozen; models/experts.py)."""
    from peft import LoraConfig, get_peft_model

    config = random_shape_config(key)
    config.num_hidden_layers = 2
    model = get_peft_model(meta_model(config), LoraConfig(r=16, **lora_arguments(meta_model(config), targets, 16)))
    arch = replace(architecture_from_table(key), num_hidden_layers=2)
    ours = count_params(arch, RunSpec(model=key, mode="lora", lora_r=16, lora_target_modules=targets)).lora
    assert ours == sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_arguments(model, targets, rank):
    from finetune_launcher.models.experts import is_moe, lora_targets

    return lora_targets(model, targets, rank, 8) if is_moe(model) else {"target_modules": targets}


# ------------------------------------------------------------------ FLOPs

def counted_flops(model, batch):
    """(forward, forward + backward) FLOPs torch's FlopCounterMode counts on a real step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(**batch).loss
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_per_token_equal_torch_flop_counter(mode, checkpointing):
    """Eager attention (its matmuls are what FlopCounterMode sees; SDPA's CPU kernel has no FLOP formula) on packed
    rows: forward 2N + attention; backward 4N full, 2N LoRA; checkpointing recomputes the layers but the last
    matmul of each. Tolerance 2.5%: with LoRA, layer 0's q/k/v inputs come from the frozen embedding, so autograd
    skips their input gradients (1 layer in 4 here, 1 in 32 for an 8B model), which the estimate counts."""
    from tests.e2e.test_estimate_engine import build_model, packed_rows
    from finetune_launcher.data.text import collate

    torch.manual_seed(0)
    name, micro, seq = "builtin:tiny-llama", 2, 128
    model = build_model(name, mode, checkpointing, attn_implementation="eager")
    forward, total = counted_flops(model, collate(packed_rows(micro, seq), 0, True))
    spec = RunSpec(model=name, mode=mode, max_length=seq, micro_batch_size=micro, gradient_checkpointing=checkpointing,
                   lora_dropout=0.0, gpu="cpu", attn_implementation="eager")
    arch = load_architecture(name)
    ours = flops_per_token(arch, spec, count_params(arch, spec), masked=True)
    assert ours["forward"] * micro * seq == pytest.approx(forward, rel=1e-6)
    assert ours["total"] * micro * seq == pytest.approx(total, rel=0.025)


def test_the_base_model_and_the_adapter_are_reported_apart(tmp_path, capsys):
    """LoRA on every linear of an MoE, its experts included (the issue's Qwen3-30B-A3B printed 31.53B as its total,
    30.53B real): the JSON and the table give the model's parameters as transformers builds it and the adapter's as
    peft adds it for the trainer's targets, apart."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from finetune_launcher.estimate.cli import main

    config = AutoConfig.for_model("qwen3_moe", **TINY_TEXT, num_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=32, decoder_sparse_step=1, tie_word_embeddings=False)
    config.save_pretrained(tmp_path / "moe")
    model = meta_model(config)
    base = numel(model.parameters())
    adapted = get_peft_model(model, LoraConfig(r=8, **lora_arguments(model, "all-linear", 8)))
    adapter = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    argv = ["--model", str(tmp_path / "moe"), "--mode", "lora", "--lora-r", "8", "--gpu", "H100-80GB",
            "--no-calibration"]
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["params_base"], data["params_adapter"], data["params_trainable"]) == (base, adapter, adapter)
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"{base / 1e9:.3f} B in the model + {adapter / 1e6:.2f} M adapter" in table
