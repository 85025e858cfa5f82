"""Mixtures of experts in one process: the tiny Qwen3-MoE and the random: Qwen3-30B-A3B shape, LoRA on the attention
and the experts' fused weights with the router and norms frozen, the experts' targets by name, the grouped LoRA
kernel against peft's, the router's load-balancing loss and expert load, QLoRA keeping the experts 16-bit, and the
ZeRO-3 unit of gathering."""
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import assert_refused_before_launch, launch_here, resolve

MOE_LORA = "configs/tiny_moe_lora.yaml"


@pytest.fixture(scope="module")
def tiny_moe_path():
    from finetune_launcher.models.references import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen3-moe")


def load_tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def lora_settings(**overrides):
    settings = dict(mode="lora", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    lora_target_modules="all-linear", gradient_checkpointing=False, moe_lora_kernel="peft")
    return SimpleNamespace(**{**settings, **overrides})


def with_lora(path, **overrides):
    from finetune_launcher.recipes.causal_lm.model import prepare_for_training

    torch.manual_seed(0)
    return prepare_for_training(load_tiny(path), lora_settings(**overrides))


def trainable(model):
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}


def batch(seed=0, rows=2, length=48):
    ids = torch.randint(5, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------- the models

def test_tiny_moe_loads_as_a_hub_qwen3_moe_with_fused_experts(tiny_moe_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_moe_path)
    assert (config.model_type, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == \
        ("qwen3_moe", 8, 2, True)
    model = load_tiny(tiny_moe_path)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 2 * 64, 128) and experts.down_proj.shape == (8, 128, 64)
    assert type(model.model.layers[0].mlp.gate).__name__ == "Qwen3MoeTopKRouter"


def test_tiny_moe_routes_training_text_to_every_expert(tiny_moe_path):
    """The builder balances the random routers: on the shipped data no expert of any layer is left out, none takes
    more than a third of the tokens (1/8 each when even)."""
    from transformers import AutoTokenizer

    from finetune_launcher.recipes.causal_lm.tiny import _corpus_lines

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_path)
    texts = [text for text, _ in zip(list(_corpus_lines())[1000:], range(32))]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        logits = load_tiny(tiny_moe_path)(**inputs, output_router_logits=True).router_logits
    real = inputs["attention_mask"].reshape(-1).bool()
    for layer in logits:
        share = torch.bincount(layer[real].topk(2).indices.flatten(), minlength=8) / (2 * real.sum())
        assert 0 < share.min() and share.max() < 1 / 3, share


def test_random_qwen3_30b_a3b_is_the_published_model():
    """random:qwen3-30b-a3b against Qwen/Qwen3-30B-A3B's config.json (values as published on the hub) and its
    parameter count (30.5B), built on the meta device."""
    from transformers import AutoModelForCausalLM

    from finetune_launcher.models.references import random_shape_config

    config = random_shape_config("qwen3-30b-a3b")
    published = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     norm_topk_prob=True, router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
                     max_position_embeddings=40960, sliding_window=None)
    assert {k: getattr(config, k) for k in published} == published
    assert config.rope_parameters["rope_theta"] == 1_000_000
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 30_532_122_624


# ---------------------------------------------------------------- LoRA targets

def test_all_linear_puts_lora_on_attention_and_experts_with_router_and_norms_frozen(tiny_moe_path):
    model = with_lora(tiny_moe_path)
    names = trainable(model)
    layer = "model.layers.0."
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"{layer}self_attn.{projection}.lora_A.default.weight" in names
    assert not any(".gate." in n or "norm" in n or "embed" in n or "lm_head" in n for n in names), names
    gate_up, down = model.base_model.model.model.layers[0].mlp.experts.base_layer, \
        model.base_model.model.model.layers[0].mlp.experts
    assert (gate_up.parameter_name, down.parameter_name) == ("gate_up_proj", "down_proj")
    # gate_up_proj holds gate and up side by side: rank 2r there, so each projection keeps rank r
    assert gate_up.lora_A["default"].weight.shape == (8 * 2 * 4, 128) and gate_up.scaling["default"] == 2.0
    assert down.lora_A["default"].weight.shape == (8 * 4, 64) and down.scaling["default"] == 2.0
    assert not model.base_model.model.model.layers[0].mlp.gate.weight.requires_grad


@pytest.mark.parametrize("targets, expect_modules, expect_experts", [
    (["q_proj", "v_proj", "experts"], {"q_proj", "v_proj"}, {"gate_up_proj", "down_proj"}),
    (["o_proj", "down_proj"], {"o_proj"}, {"down_proj"}),
    (["q_proj", "gate_proj", "up_proj"], {"q_proj"}, {"gate_up_proj"}),   # a transformers-4 target list
    (["q_proj", "k_proj"], {"q_proj", "k_proj"}, set()),
    (["experts"], set(), {"gate_up_proj", "down_proj"}),
])
def test_the_experts_targets_are_nameable(tiny_moe_path, targets, expect_modules, expect_experts):
    model = with_lora(tiny_moe_path, lora_target_modules=targets)
    modules = {n.split(".")[-4] for n in trainable(model) if "self_attn" in n}
    wrappers = {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"}
    assert (modules, wrappers) == (expect_modules, expect_experts)


def test_the_router_as_a_lora_target_is_refused_before_launch(capsys):
    proc = launch_here(capsys, MOE_LORA, "--lora_target_modules", "[q_proj, mlp.gate]")
    assert_refused_before_launch(proc, "'gate' is the router", "mode: full")


def test_lora_dropout_applies_to_the_linear_layers_and_not_to_the_experts(tiny_moe_path):
    """peft's LoRA on a fused 3D weight takes no dropout: lora_dropout stays on the attention's LoRA."""
    model = with_lora(tiny_moe_path, lora_dropout=0.1)
    attention = model.base_model.model.model.layers[0].self_attn.q_proj
    assert attention.lora_dropout["default"].p == 0.1
    assert model.peft_config["default"].lora_dropout == 0.0


# ---------------------------------------------------------------- the grouped kernel

def outputs_and_gradients(model, inputs):
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


def test_grouped_kernel_gives_peft_outputs_and_gradients(tiny_moe_path):
    """moe_lora_kernel: grouped (x.A.B on each token's expert) against peft's path (the adapter folded into the
    whole expert weight), with non-zero B so the experts' LoRA counts."""
    models = {}
    for kernel in ("peft", "grouped"):
        models[kernel] = with_lora(tiny_moe_path, moe_lora_kernel=kernel)
    for name, p in trainable(models["peft"]).items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    models["grouped"].load_state_dict(models["peft"].state_dict())
    inputs = batch()
    logits_peft, grads_peft = outputs_and_gradients(models["peft"], inputs)
    logits_grouped, grads_grouped = outputs_and_gradients(models["grouped"], inputs)
    base = load_tiny(tiny_moe_path)(input_ids=inputs["input_ids"]).logits.detach()
    assert (logits_peft - base).abs().max() > 1e-2, "the adapter must change the outputs for the test to mean much"
    torch.testing.assert_close(logits_grouped, logits_peft, rtol=1e-5, atol=1e-5)
    assert grads_peft.keys() == grads_grouped.keys() and any("experts.lora_B" in n for n in grads_peft)
    for name in grads_peft:
        torch.testing.assert_close(grads_grouped[name], grads_peft[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_kernel_follows_disabled_adapters(tiny_moe_path):
    """peft's disable_adapter() (what comparing against the base does) turns the experts' LoRA off too."""
    model = with_lora(tiny_moe_path, moe_lora_kernel="grouped")
    for name, p in trainable(model).items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    inputs = {"input_ids": batch()["input_ids"]}
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**inputs).logits
    base = load_tiny(tiny_moe_path)(**inputs).logits.detach()
    torch.testing.assert_close(disabled, base)


# ---------------------------------------------------------------- the router's balance

def router_balance(model, coefficient):
    from finetune_launcher.models.router_balance import RouterBalance

    cfg = SimpleNamespace(router_aux_loss_coef=coefficient)
    return RouterBalance.for_model(model, cfg, SimpleNamespace(device=torch.device("cpu"), is_main=True))


def test_the_aux_loss_is_added_once_per_micro_batch_not_divided_by_the_tokens(tiny_moe_path):
    """With every label masked the token loss is 0 whatever the step's token count (num_items_in_batch), so the
    router's gradient is the auxiliary loss's alone: coefficient x its gradient, the same for 1 or 1000 tokens.
    The returned value is the token loss (what is logged); the gradient has both."""
    model = load_tiny(tiny_moe_path)
    balance = router_balance(model, coefficient=0.5)
    inputs = dict(batch(), labels=torch.full((2, 48), -100))
    router = model.model.layers[1].mlp.gate.weight
    gradients = []
    for tokens in (1.0, 1000.0):
        model.zero_grad()
        out = model(**inputs, num_items_in_batch=tokens, output_router_logits=True)
        loss = balance.loss(out)
        assert loss.item() == out.loss.item() == 0.0
        loss.backward()
        gradients.append(router.grad.clone())
    model.zero_grad()
    model(**inputs, output_router_logits=True).aux_loss.backward()
    torch.testing.assert_close(gradients[0], gradients[1])
    torch.testing.assert_close(gradients[0], 0.5 * router.grad)
    assert gradients[0].abs().max() > 0


def test_the_coefficient_comes_from_the_model_config_unless_the_run_sets_it(tiny_moe_path):
    model = load_tiny(tiny_moe_path)
    assert router_balance(model, None).coefficient == 0.001
    assert router_balance(model, 0.02).coefficient == 0.02
    assert model.router_aux_loss_coef == 0.0, "transformers must not add it a second time"


def test_expert_load_shares_and_the_idle_expert_warning(tiny_moe_path, capsys):
    """Two forwards' routing summed: per layer the busiest and the idlest expert's share; an expert no token went
    to in the interval is named in a warning; the next interval starts from zero."""
    from finetune_launcher.models.router_balance import RouterBalance

    balance = RouterBalance(0.001, num_experts=4, top_k=1, device=torch.device("cpu"), is_main=True)
    aux = torch.tensor(1.0)
    # layer 0: experts 0, 0, 1, 2 then 0, 1, 2, 3 -> expert 0 has 3 of 8; layer 1: always expert 2
    first = [torch.eye(4)[[0, 0, 1, 2]], torch.eye(4)[[2, 2, 2, 2]]]
    second = [torch.eye(4)[[0, 1, 2, 3]], torch.eye(4)[[2, 2, 2, 2]]]
    balance.record(first, aux)
    balance.record(second, 3 * aux)
    metrics = balance.metrics(step=10)
    assert metrics == {"aux_loss": 2.0, "expert_load": {"busiest": [0.375, 1.0], "idlest": [0.125, 0.0]}}
    warning = capsys.readouterr().err
    assert "step 10" in warning and "layer 1: experts 0, 1, 3" in warning and "layer 0" not in warning
    balance.record(second, aux)
    assert balance.metrics(step=11)["expert_load"]["busiest"] == [0.25, 1.0]


# ---------------------------------------------------------------- the estimate

@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"], ["v_proj", "experts"]])
def test_the_estimate_counts_the_adapter_the_trainer_adds(tiny_moe_path, targets):
    from finetune_launcher.estimate import RunSpec, count_params, load_architecture

    trained = sum(p.numel() for p in trainable(with_lora(tiny_moe_path, lora_target_modules=targets)).values())
    spec = RunSpec(model=tiny_moe_path, mode="lora", lora_r=4, lora_target_modules=targets)
    assert count_params(load_architecture(tiny_moe_path), spec).lora == trained


def kept_bytes(model, inputs):
    from finetune_launcher.profiling import kept_for_backward

    with kept_for_backward(model) as kept:
        model(**inputs)
    return sum(kept.values())


def test_the_estimate_counts_the_expert_weight_peft_keeps_for_the_backward(tiny_moe_path):
    """moe_lora_kernel peft keeps a full-size copy of each layer's LoRA'd expert weights for the backward; the
    grouped kernel does not. The estimate's term against what autograd keeps beyond the parameters."""
    from dataclasses import replace

    from finetune_launcher.estimate import RunSpec, load_architecture
    from finetune_launcher.estimate.activations import activation_shape, expert_lora_weight_bytes

    inputs = batch(rows=2, length=128)
    measured = (kept_bytes(with_lora(tiny_moe_path, moe_lora_kernel="peft"), inputs)
                - kept_bytes(with_lora(tiny_moe_path, moe_lora_kernel="grouped"), inputs))
    arch = load_architecture(tiny_moe_path)
    spec = RunSpec(model=tiny_moe_path, mode="lora", lora_r=4, lora_dropout=0.0, max_length=128, micro_batch_size=2,
                   precision="fp32", moe_lora_kernel="peft")
    shape = activation_shape(spec, "fp32")
    predicted = arch.num_hidden_layers * expert_lora_weight_bytes(arch, spec, shape)
    assert predicted == pytest.approx(measured, rel=0.15)
    assert expert_lora_weight_bytes(arch, replace(spec, moe_lora_kernel="grouped"), shape) == 0


# ---------------------------------------------------------------- QLoRA, ZeRO-3, the header

def test_qlora_quantizes_the_linears_and_keeps_the_experts_16_bit(tmp_path):
    """bitsandbytes quantizes the attention's nn.Linear layers; the fused experts stay in the compute dtype (bf16),
    not upcast to fp32 as peft's k-bit preparation would; the LoRA on both gets gradients."""
    import bitsandbytes as bnb

    from finetune_launcher.recipes.causal_lm.model import load_model

    cfg = resolve(MOE_LORA, {"mode": "qlora", "precision": "bf16", "output_dir": str(tmp_path)})
    model, _ = load_model(cfg, torch.device("cpu"))
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert layer.mlp.experts.get_base_layer().gate_up_proj.dtype == torch.bfloat16
    out = model(**batch(rows=1, length=32))
    out.loss.backward()
    assert layer.mlp.experts.lora_B["default"].weight.grad.abs().max() > 0  # B starts at 0: A's gradient is 0
    assert layer.self_attn.q_proj.lora_B["default"].weight.grad.abs().max() > 0
    assert "4-bit NF4: the nn.Linear layers" in cfg.decisions["experts"]
    assert "16-bit: the fused expert weights" in cfg.decisions["experts"]


def test_zero3_gathers_each_moe_block_as_one_unit(tiny_moe_path):
    from deepspeed.utils import z3_leaf_module

    from finetune_launcher.engines import gather_whole_moe_blocks

    model = load_tiny(tiny_moe_path)
    gather_whole_moe_blocks(model)
    blocks = [layer.mlp for layer in model.model.layers]
    assert all(z3_leaf_module(block) for block in blocks)
    assert not any(z3_leaf_module(m) for m in model.modules() if not any(m is b for b in blocks))


def test_the_header_says_what_trains_on_a_mixture_of_experts():
    lora = resolve(MOE_LORA).decisions["experts"]
    assert "8 experts" in lora and "experts' fused 3D weights" in lora and "router and norms frozen" in lora
    full = resolve("configs/tiny_moe_full.yaml").decisions["experts"]
    assert "every weight trains" in full
    assert "experts" not in resolve("configs/tiny_lora.yaml").decisions
