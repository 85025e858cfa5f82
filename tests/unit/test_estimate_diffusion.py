"""The estimator's diffusion path against independent references: SD1.5's published parameter counts (and the seed
log's LoRA count), the tiny pipeline loaded for real, a real CPU training step of the tiny pipeline (autograd's
saved-tensor hooks, torch's allocation counter, FlopCounterMode with eager attention), bitsandbytes' NF4 storage of
the QLoRA UNet, and the calibration fit on a diffusion history."""
import json
import types

import pytest
import torch

from tests.conftest import peak_of
from finetune_launcher.profiling import kept_for_backward
from finetune_launcher.estimate import RunSpec, calibrate_from_history, estimate
from finetune_launcher.recipes.diffusion.estimate import load_pipeline
from finetune_launcher.recipes.diffusion.estimate_meta import lora_counts, pipeline_counts
from finetune_launcher.recipes.diffusion.estimate_table import PUBLISHED_PIPELINE_PARAMS

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def tiny_spec(**changes):
    fields = dict(model="builtin:tiny-sd", recipe="diffusion", mode="lora", lora_r=4, lora_target_modules=TARGETS,
                  lora_dropout=0.0, resolution=64, micro_batch_size=2, gpu="cpu", precision="fp32", packing=False)
    return RunSpec(**{**fields, **changes})


def tiny_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from finetune_launcher.models.references import resolve_model_path

    path = resolve_model_path("builtin:tiny-sd")
    parts = (UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
             AutoencoderKL.from_pretrained(path, subfolder="vae"),
             CLIPTextModel.from_pretrained(path, subfolder="text_encoder"))
    for part in parts:
        part.requires_grad_(False)
    return parts


def test_sd15_counts_equal_the_published_ones():
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    counts = pipeline_counts(pipe.unet, pipe.vae, pipe.text_encoder)
    published = PUBLISHED_PIPELINE_PARAMS["sd15"]
    assert (counts["unet"], counts["vae"], counts["text_encoder"]) == \
        (published["unet"], published["vae"], published["text_encoder"])
    assert lora_counts(pipe.unet, pipe.text_encoder, 16, tuple(TARGETS), False)[0] == \
        published["unet_lora_r16_attention"]


def test_tiny_pipeline_counts_equal_the_loaded_pipeline():
    unet, vae, text = tiny_parts()
    pipe = load_pipeline("builtin:tiny-sd")
    counts = pipeline_counts(pipe.unet, pipe.vae, pipe.text_encoder)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (counts["unet"], counts["vae"], counts["text_encoder"]) == (numel(unet), numel(vae), numel(text))
    assert sum(counts["unet_linear_sizes"]) == sum(m.weight.numel() for m in unet.modules()
                                                   if type(m) is torch.nn.Linear)


def real_step(checkpointing, dropout, flops=False):
    """One training step of the tiny pipeline on the CPU (2 pictures of 64 px, LoRA r=4 on the attention
    projections, AdamW): (bytes saved for backward, peak bytes allocated during the step, FlopCounterMode's
    (forward, total) of the UNet or None)."""
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet, vae, text = tiny_parts()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, target_modules=TARGETS))
    if flops:
        unet.set_attn_processor(AttnProcessor())  # bmm attention: what FlopCounterMode counts
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad])
    counter = FlopCounterMode(display=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with torch.no_grad():
            latents = vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.sample()
            states = text(torch.zeros(2, 77, dtype=torch.long))[0]
        with counter if flops else torch.enable_grad():
            with kept_for_backward(unet) as sizes:
                prediction = unet(latents, torch.tensor([10, 500]), states).sample
            forward = counter.get_total_flops()
            torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
        optimizer.step()
    return sum(sizes.values()), peak_of(profiler), (forward, counter.get_total_flops()) if flops else None


@pytest.mark.parametrize("checkpointing,dropout", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_activations_and_peak_match_a_real_cpu_step(checkpointing, dropout):
    """Saved bytes: the meta-device count equals the real step's to 0.5%. Peak: what the step allocated on top of
    the weights (activations, backward's buffers, gradients, AdamW states) against the estimate's peak without its
    margin, runtime and weights, within 10%."""
    saved, peak, _ = real_step(checkpointing, dropout)
    result = estimate(tiny_spec(gradient_checkpointing=checkpointing, lora_dropout=dropout), calibration={},
                      with_alternatives=False)
    assert result.memory["activations"] == pytest.approx(saved, rel=0.005)
    predicted = result.peak_bytes / (1 + result.spec.margin) - result.memory["runtime"] - result.memory["weights"]
    assert predicted == pytest.approx(peak, rel=0.10)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unet_flops_equal_the_flop_counter_on_a_real_step(checkpointing):
    _, _, (forward, total) = real_step(checkpointing, 0.0, flops=True)
    flops = estimate(tiny_spec(gradient_checkpointing=checkpointing), calibration={},
                     with_alternatives=False).timing["flops_per_token"]
    images = 2
    assert flops["forward"] * images == pytest.approx(forward, rel=0.01)
    assert (flops["forward"] + flops["backward"] + flops["recompute"]) * images == pytest.approx(total, rel=0.02)


def test_qlora_weights_equal_bitsandbytes_storage():
    """The QLoRA UNet as the recipe's model.py loads it (nn.Linear -> NF4 double quant, the rest and the
    adapters fp32 here), plus the frozen VAE and text encoder: bytes of every parameter and quant_state tensor."""
    from finetune_launcher.recipes.diffusion.model import load_diffusion

    cfg = types.SimpleNamespace(model="builtin:tiny-sd", mode="qlora", precision="fp32", lora_r=4, lora_alpha=4,
                                lora_dropout=0.0, lora_target_modules=TARGETS, gradient_checkpointing=False,
                                text_encoder_lora=False, zero_stage=2, bnb_4bit_quant_storage="uint8")
    parts = load_diffusion(cfg, torch.device("cpu"))
    held = 0
    for module in (parts.model.unet, parts.model.text_encoder, parts.vae):
        for param in module.parameters():
            held += param.untyped_storage().nbytes()
            state = getattr(param, "quant_state", None)
            if state is not None:
                nested = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
                held += sum(t.untyped_storage().nbytes() for t in nested)
    predicted = estimate(tiny_spec(mode="qlora", micro_batch_size=1), calibration={}, with_alternatives=False)
    assert predicted.counts.quantized > 0
    assert predicted.memory["weights"] == pytest.approx(held, rel=0.001)


def test_sd15_on_a_24gb_gpu_fits_and_qlora_saves_the_linear_weights():
    spec = RunSpec(model="runwayml/stable-diffusion-v1-5", recipe="diffusion", mode="lora", lora_r=16,
                   lora_target_modules=TARGETS, lora_dropout=0.05, micro_batch_size=1, gradient_accumulation_steps=4,
                   gpu="RTX-4090",
                   precision="bf16", max_steps=100, packing=False, gradient_checkpointing=False)
    lora = estimate(spec, calibration={}, with_alternatives=False)
    qlora = estimate(RunSpec(**{**spec.__dict__, "mode": "qlora"}), calibration={}, with_alternatives=False)
    assert lora.fits and qlora.fits and lora.total_steps == 100
    saved = lora.memory["weights"] - qlora.memory["weights"]
    assert saved == pytest.approx(qlora.counts.quantized * (2 - 0.516), rel=0.01)  # bf16 -> NF4
    assert lora.to_json()["unit"] == "images"


def test_diffusion_calibration_has_its_own_key(tmp_path):
    from finetune_launcher.config import resolve_run_config
    from finetune_launcher.config.machine import named

    config_file = tmp_path / "sd.yaml"
    config_file.write_text("recipe: diffusion\nmode: lora\nmodel: builtin:tiny-sd\ndataset: data/tiny_sd\n"
                           "resolution: 64\nlora_r: 4\nmicro_batch_size: 2\nmax_steps: 8\n"
                           "gradient_checkpointing: false\n")
    config = resolve_run_config(str(config_file), procs_per_node=1, machine=named("cpu")).as_dict()
    history = {"metadata": {"config": config, "world_size": 1, "device": "cpu", "precision": "fp32",
                            "run_name": "sd"},
               "records": [{"step": step, "step_time_s": 0.9} for step in range(1, 9)]}
    cold, entry, calibrated = calibrate_from_history(history, path=tmp_path / "calibration.json")
    assert entry["key"] == "cpu/fp32/diffusion" and cold.spec.recipe == "diffusion"
    assert calibrated.step_time_s == pytest.approx(0.9, rel=1e-6)
    language = estimate(RunSpec(model="builtin:tiny-llama", gpu="cpu", precision="fp32"),
                        calibration={entry["key"]: entry}, with_alternatives=False)
    assert language.timing["calibration_factor"] is None


def test_the_diffusion_recipe_claims_diffusers_pipelines_only(tmp_path, tiny_model_path):
    """The recipe table's model facts: builtin:tiny-sd and a pipeline directory give the UNet's widest block, for
    `recipe: auto` too; a hub id of the estimator's offline table its entry's, for a pre-flight of another machine;
    a causal LM and an unknown name are not pipelines. `recipe: auto` picks the diffusion recipe for what is
    claimed."""
    import json
    import shutil
    from pathlib import Path

    from finetune_launcher import recipe_table
    from finetune_launcher.models.references import resolve_model_path

    claim = recipe_table.part("diffusion", "model_facts")
    tiny = Path(resolve_model_path("builtin:tiny-sd"))
    widest = max(json.loads((tiny / "unet" / "config.json").read_text())["block_out_channels"])
    copied = shutil.copytree(tiny, tmp_path / "my-pipeline")
    for model in ("builtin:tiny-sd", str(copied)):
        facts = claim({"model": model, "recipe": "auto"})
        assert (facts.pipeline, facts.hidden_size, facts.widest) == (True, widest, 8 * widest)
        assert recipe_table.detect(facts).name == "diffusion"
    sd15 = {"model": "runwayml/stable-diffusion-v1-5", "recipe": "auto"}
    assert claim(sd15, require_model=False).hidden_size == 1280
    assert claim({"model": str(tiny_model_path), "recipe": "auto"}) is None
    assert claim({"model": "Qwen/Qwen2.5-7B-Instruct", "recipe": "auto"}, require_model=False) is None


def test_an_estimate_for_a_pipeline_of_the_offline_table_needs_no_recipe_flag(capsys):
    """`estimate --model runwayml/stable-diffusion-v1-5 ...` on a machine without the pipeline: the recipe follows
    the model, as the config resolution detects it."""
    from finetune_launcher.estimate.cli import main

    argv = ["--model", "runwayml/stable-diffusion-v1-5", "--gpu", "RTX-4090", "--resolution", "256", "--json",
            "--no-calibration"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["unit"] == "images" and data["inputs"]["recipe"] == "diffusion" and data["fits"]
