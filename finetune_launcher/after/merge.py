"""Merging a LoRA / QLoRA adapter into its base: sharded safetensors + the tokenizer or processor, checked against
base + adapter (on inputs the recipe's after part chooses) before the output directory appears."""
from dataclasses import dataclass
from pathlib import Path

from finetune_launcher.after.bases import (has_tokenizer, is_qlora, load_base_for, load_model, load_preprocessor,
                                           pick_device, require_bitsandbytes, uses_dequantized_base)
from finetune_launcher.after.loading import check_adapter_dir, prepare_adapters, resolve_base
from finetune_launcher.after.parts import after_part
from finetune_launcher.after.run_files import TRAINING_INFO, AdapterError, read_training_info
from finetune_launcher.dtypes import dtype_name, torch_dtype

MERGE_TOLERANCE = {"float32": (1e-4, 1e-5), "16-bit": (1e-2, 1e-2)}  # (absolute, relative to the largest logit)


@dataclass
class MergeResult:
    out_dir: Path
    recipe: str
    base_reference: str
    dtype: str
    files: list
    max_abs_diff: float
    tolerance: float


def check_merge_target(out_dir, adapter_dir, base_path, overwrite):
    """Refuse to write over anything but an earlier merge (or an empty directory), and never over the inputs."""
    out = Path(out_dir).resolve()
    for name, protected in (("adapter", adapter_dir), ("base model", base_path)):
        protected = Path(protected).resolve()
        if protected.exists() and (out == protected or out in protected.parents):
            raise AdapterError(f"--out {out_dir} would overwrite the {name} at {protected}; choose another --out")
    if not out.exists():
        return
    if not overwrite:
        raise AdapterError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise AdapterError(f"{out_dir} exists and is not a model directory (no config.json); refusing to delete it "
                           f"even with --overwrite. Choose another --out")


def merge_dtype(name):
    """'auto': the base checkpoint's own dtype, so the merged model is stored like the base."""
    return "auto" if name == "auto" else torch_dtype(name)


def sample_logits(model, samples):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in samples]


def logits_difference(reference, merged, dtype):
    """(max |difference| over all samples, tolerance for the dtype)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    scale = max(float(a.abs().max()) for a in reference)
    absolute, relative = MERGE_TOLERANCE["float32" if str(dtype) == "torch.float32" else "16-bit"]
    return diff, absolute + relative * scale


def merge_adapter(adapter_dir, out_dir, base=None, dtype="auto", max_shard_size="5GB", overwrite=False,
                  device="cpu", trust_remote_code=False, log=print, qlora_base="dequantized"):
    """Merge a LoRA/QLoRA adapter into its base (a QLoRA adapter into the de-quantized base it was trained against,
    or with qlora_base 'original' into the stored full-precision one), save sharded safetensors + tokenizer to
    `out_dir`, then reload what was saved and check its logits against base + adapter. `out_dir` appears only if
    the check passes."""
    import shutil

    from finetune_launcher.fsutil import fresh_tmp_dir

    adapter_dir, out_dir = check_adapter_dir(adapter_dir), Path(out_dir)
    reference, base_path = resolve_base(adapter_dir, base)
    check_merge_target(out_dir, adapter_dir, base_path, overwrite)
    _, _, recipe = prepare_adapters([adapter_dir], base, trust_remote_code)
    dequantized = uses_dequantized_base([adapter_dir], qlora_base)
    if dequantized:
        require_bitsandbytes()
        log("QLoRA adapter: merging into the de-quantized base: the base loaded in 4-bit NF4 (double quant) as in "
            "training, then de-quantized, i.e. the weights the adapter was trained against "
            "(--qlora-base original: the full-precision base)")
    elif is_qlora(adapter_dir):
        log("QLoRA adapter: merging into the original full-precision base (--qlora-base original), not the "
            "de-quantized 4-bit weights the adapter was trained against; the merged model differs slightly from "
            "the model as trained")
    device = pick_device(device)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp_dir(out_dir)
    try:
        samples, expected, saved_dtype = save_merged(adapter_dir, base_path, tmp, dtype, max_shard_size, device,
                                                     recipe, trust_remote_code, qlora_base)
        log(f"merged {adapter_dir} into {reference} ({dtype_name(saved_dtype)}); checking the saved model")
        reloaded = load_model(tmp, saved_dtype, device, recipe, trust_remote_code)
        diff, tolerance = logits_difference(expected, sample_logits(reloaded, samples), saved_dtype)
        del reloaded
        if diff > tolerance:
            raise AdapterError(f"the merged model's logits differ from base + adapter by up to {diff:.3g} (tolerance "
                               f"{tolerance:.3g}); nothing was written to {out_dir}. Merge in float32 (--dtype "
                               f"float32) or check that --base is the model the adapter was trained on")
        publish_merged(tmp, out_dir, adapter_dir, reference, saved_dtype, diff,
                       qlora_base if is_qlora(adapter_dir) else None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    return MergeResult(out_dir, recipe, reference, dtype_name(saved_dtype), files, diff, tolerance)


def save_merged(adapter_dir, base_path, tmp, dtype, max_shard_size, device, recipe, trust_remote_code=False,
                qlora_base="dequantized"):
    """Load base (de-quantized for a QLoRA adapter, see load_base_for) + adapter, record logits on the samples,
    merge, save model and tokenizer (or processor) into `tmp`. Returns (samples, logits before merging, dtype
    saved). Frees the model before returning, so that the check which reloads the saved copy never holds two
    models."""
    import tempfile

    from peft import PeftModel

    model = load_base_for([adapter_dir], base_path, merge_dtype(dtype), device, recipe, trust_remote_code, qlora_base)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device).eval()
    preprocessor = load_preprocessor(recipe, adapter_dir if has_tokenizer(adapter_dir) else base_path,
                                     trust_remote_code)
    with tempfile.TemporaryDirectory() as scratch:
        samples = after_part(recipe).merge_check_inputs(preprocessor, model, scratch)
    expected = sample_logits(model, samples)
    merged = model.merge_and_unload()
    saved_dtype = next(merged.parameters()).dtype
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    preprocessor.save_pretrained(tmp)
    return samples, expected, saved_dtype


def publish_merged(tmp, out_dir, adapter_dir, reference, saved_dtype, diff, qlora_base=None):
    """Record where the model came from (training_info.json keeps the run's dataset format for the tools; for a
    QLoRA adapter, which base it went into), then move it into place."""
    from finetune_launcher.fsutil import apply_umask, atomic_write_json, replace_dir

    merged = {"adapter": str(Path(adapter_dir).resolve()), "base_model": reference, "dtype": dtype_name(saved_dtype),
              "max_abs_logit_diff": diff}
    if qlora_base:
        merged["qlora_base"] = qlora_base
    info = {**read_training_info(adapter_dir), "merged": merged}
    atomic_write_json(Path(tmp) / TRAINING_INFO, info)
    apply_umask(tmp)
    replace_dir(tmp, out_dir)
