"""`random:ARCH` QLoRA builds the 4-bit model on the device one decoder layer at a time (no checkpoint on disk, the
16-bit model never whole): the same modules, dtypes and bytes as transformers' bitsandbytes loader gives, peft and
training work on it, and the peak stays below the 16-bit model. Tiny shapes on the CPU (bitsandbytes' NF4 runs
there)."""
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import peak_of, vl_settings

CPU = torch.device("cpu")


def qlora_settings(**overrides):
    settings = dict(mode="qlora", model="random:llama-test", precision="fp32", zero_stage=2,
                    gradient_checkpointing=False, lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                    lora_target_modules="all-linear", bnb_4bit_quant_storage="uint8", attn_implementation="sdpa",
                    trust_remote_code=False, liger_kernel=False, compile_layers=False, tokenizer=None,
                    deepspeed_dict=lambda: {})
    settings.update(overrides)
    return SimpleNamespace(**settings)


@pytest.fixture
def tiny_random_shapes(monkeypatch, tmp_path):
    """random:llama-test (small-llama's widths, 6 layers) and random:qwen3-vl-test (the tiny Qwen3-VL's), in a
    private model cache."""
    from finetune_launcher.recipes.vision_language.estimate_table import VL_ARCHITECTURES
    from finetune_launcher.models.arch_table import ARCHITECTURES
    from finetune_launcher.models.references import resolve_model_path
    from finetune_launcher.recipes.causal_lm.tiny import TINY_SPECS
    from finetune_launcher.recipes.vision_language.tiny import TEXT, VISION

    resolve_model_path("builtin:tiny-llama")  # the shared cache's tokenizer, before the cache moves
    small = TINY_SPECS["small-llama"]
    monkeypatch.setitem(ARCHITECTURES, "llama-test", dict(
        names=[], **{k: small[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "vocab_size")},
        num_hidden_layers=6, tie_word_embeddings=False))
    monkeypatch.setitem(VL_ARCHITECTURES, "qwen3-vl-test", dict(
        names=[], text=dict({k: TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads")},
                            vocab_size=1024, tie_word_embeddings=False, qk_norm=True),
        vision=dict(VISION, model_type="qwen3_vl", num_position_embeddings=64, deepstack_visual_indexes=[0]),
        pixels=dict(min_pixels=32 * 32, max_pixels=64 * 64)))
    monkeypatch.setattr("finetune_launcher.recipes.vision_language.tiny.RANDOM_VL_ROPE",
                        {"qwen3-vl": dict(rope_theta=10000.0, mrope_section=(8, 4, 4))})
    tiny_llama = resolve_model_path("builtin:tiny-llama")
    monkeypatch.setenv("FTL_CACHE_DIR", str(tmp_path / "cache"))
    # the tiny tokenizer the random shapes copy comes from the shared cache's builtin:tiny-llama
    monkeypatch.setattr("finetune_launcher.models.references.resolve_model_path",
                        _with_builtin("builtin:tiny-llama", tiny_llama, resolve_model_path))
    return tmp_path / "cache"


def _with_builtin(name, path, resolve):
    def resolve_model_path(model_ref):
        return path if model_ref == name else resolve(model_ref)
    return resolve_model_path


def quantized_linears(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_random_qlora_model_is_built_4bit_layer_by_layer_without_weights_on_disk(tiny_random_shapes, storage):
    from finetune_launcher.recipes.causal_lm.model import load_model
    from finetune_launcher.models.references import resolve_model_path

    model, _ = load_model(qlora_settings(bnb_4bit_quant_storage=storage), CPU)
    base = model.get_base_model()
    path = resolve_model_path("random:llama-test")
    assert not list(__import__("pathlib").Path(path).glob("*.safetensors"))  # nothing written
    assert base.config.num_hidden_layers == 6 and len(base.model.layers) == 6
    linears = quantized_linears(base)
    assert len(linears) == 7 * 6  # every linear of every layer; lm_head stays in the compute dtype
    assert all(".layers." in n for n in linears)
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    for module in linears.values():
        assert module.weight.quant_state.quant_type == "nf4" and module.weight.quant_state.nested
        assert module.weight.dtype == getattr(torch, storage)
    assert base.is_loaded_in_4bit and base.config.quantization_config.load_in_4bit
    # peft put its 4-bit LoRA layers on them, and they train
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(5, 1000, (2, 32))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)


def test_random_qlora_weights_take_the_bytes_the_estimator_counts(tiny_random_shapes):
    """The same storage as transformers' loader: the estimator's NF4 bytes (checked against bitsandbytes'
    quantize_4bit in test_estimate_states) and the compute dtype for everything else."""
    from transformers import AutoModelForCausalLM

    from finetune_launcher.estimate import RunSpec, count_params, load_architecture
    from finetune_launcher.estimate.model_states import weight_bytes
    from finetune_launcher.models.prepare import nf4_config as quantization_config, random_4bit_model
    from finetune_launcher.models.references import resolve_model_path

    model = random_4bit_model(resolve_model_path("random:llama-test"), AutoModelForCausalLM,
                              quantization_config("fp32", "uint8"), CPU, "sdpa")
    held = sum(t.numel() * t.element_size() for t in model.parameters())
    for module in quantized_linears(model).values():
        state = module.weight.quant_state
        held += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax,
                                                             state.state2.code)) + 4  # + the fp32 offset
    spec = RunSpec(model="random:llama-test", mode="qlora", precision="fp32")
    counts = count_params(load_architecture(spec.model), spec)
    predicted = weight_bytes(spec, counts, 4) - counts.lora * 4  # the adapters come later (peft)
    assert abs(held / predicted - 1) < 0.01


def test_random_qlora_build_never_holds_the_16bit_model(tiny_random_shapes):
    """The CPU allocator's own record (profiler memory events): the most bytes alive while building stays far below
    the weights in the compute dtype (six layers; one layer's 16-bit weights at a time)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from finetune_launcher.models.prepare import nf4_config as quantization_config, random_4bit_model
    from finetune_launcher.models.references import resolve_model_path

    path = resolve_model_path("random:llama-test")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = random_4bit_model(path, AutoModelForCausalLM, quantization_config("fp32", "uint8"), CPU, "sdpa")
    peak = peak_of(prof)
    full = sum(p.numel() for p in AutoModelForCausalLM.from_config(model.config).parameters()) * 4
    quantized = sum(m.in_features * m.out_features for m in quantized_linears(model).values())
    assert quantized > 0.9 * (full / 4 - 2 * model.config.vocab_size * model.config.hidden_size)
    assert peak < 0.5 * full, (peak, full)


def test_random_vl_qlora_quantizes_the_language_model_layers_only(tiny_random_shapes):
    import bitsandbytes as bnb

    from finetune_launcher.models.references import resolve_model_path
    from finetune_launcher.recipes.vision_language.model import load_processor, load_vl_model

    path = __import__("pathlib").Path(resolve_model_path("random:qwen3-vl-test"))
    assert (path / "preprocessor_config.json").exists() and not list(path.glob("*.safetensors"))
    settings = vl_settings(model="random:qwen3-vl-test", mode="qlora", lora_target_modules=("q_proj", "k_proj",
                                                                                           "v_proj", "o_proj"))
    processor = load_processor(settings)
    assert processor.image_processor.patch_size == 8
    model, _ = load_vl_model(settings, CPU)
    base = model.get_base_model()
    linears = quantized_linears(base)
    assert len(linears) == 7 * base.config.text_config.num_hidden_layers
    assert all(n.startswith("model.language_model.layers.") for n in linears)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in base.named_modules() if n.startswith("model.visual"))
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)  # what HF Trainer asks of a 4-bit model (bench/hf_baseline.py --qlora)
    ids = torch.randint(5, 1000, (1, 24))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 2 * 4 * base.config.text_config.num_hidden_layers
    assert all(p.grad is not None for p in trained)
