"""The vision tower of a vision-language model (Qwen3-VL, Qwen2.5-VL): its shapes and parameters, the image tokens
of a picture (the Qwen2-VL image processor's rules), what it adds to a micro-batch's memory and FLOPs.

What runs: every picture of a micro-batch is cut into patch_size x patch_size patches (an image is one temporal
patch), the vision blocks run over all patches (attention within each image; Qwen2.5-VL within windows but in its
full-attention blocks), and the merger(s) fold merge_size x merge_size patches into one image token of the
language model's width (Qwen3-VL's DeepStack mergers do the same for three inner blocks). The tower is frozen
unless train_merger (the mergers train) or lora_vision (LoRA on the blocks' linear layers): a frozen tower whose
input needs no gradient keeps nothing for backward and is not recomputed, so it costs its weights (in the compute
dtype even under QLoRA: only the language model is NF4), one block's working set and its forward FLOPs.
"""
import math
from dataclasses import dataclass

from finetune_launcher.estimate.inputs import EstimateError

TEXT_TOKENS_PER_ROW = 32  # the default picture leaves this much of a row to its text
PIXEL_BOUNDS = {"qwen3_vl": (65536, 16777216), "qwen2_5_vl": (3136, 12845056)}  # preprocessor_config.json


@dataclass(frozen=True)
class VisionTower:
    kind: str                 # transformers' model_type: qwen3_vl | qwen2_5_vl
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    deepstack: int = 0        # DeepStack mergers (Qwen3-VL)
    num_position_embeddings: int = 0
    window_size: int = 0      # pixels (Qwen2.5-VL window attention)
    full_attention_blocks: int = 0
    min_pixels: int = 3136
    max_pixels: int = 12845056

    @property
    def factor(self):
        return self.patch_size * self.merge_size

    @property
    def mergers(self):
        return 1 + self.deepstack

    def block_linears(self):
        """(name, in_features, out_features) of one vision block's linear layers (all with biases)."""
        h, i = self.hidden_size, self.intermediate_size
        mlp = [("linear_fc1", h, i), ("linear_fc2", i, h)] if self.kind == "qwen3_vl" else \
            [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        return [("qkv", h, 3 * h), ("proj", h, h)] + mlp

    def block_params(self):
        norms = 4 * self.hidden_size if self.kind == "qwen3_vl" else 2 * self.hidden_size  # LayerNorm / RMSNorm
        return sum(i * o + o for _, i, o in self.block_linears()) + norms

    def merger_linear_params(self):
        wide = self.hidden_size * self.merge_size ** 2
        return wide * wide + wide + wide * self.out_hidden_size + self.out_hidden_size

    def merger_params(self):
        """All mergers: the main one normalises the hidden width before folding (LayerNorm for Qwen3-VL, RMSNorm
        for Qwen2.5-VL), DeepStack's the folded width (LayerNorm)."""
        h, wide = self.hidden_size, self.hidden_size * self.merge_size ** 2
        main = self.merger_linear_params() + (2 * h if self.kind == "qwen3_vl" else h)
        return main + self.deepstack * (self.merger_linear_params() + 2 * wide)

    def embed_params(self):
        conv = 3 * self.temporal_patch_size * self.patch_size ** 2 * self.hidden_size
        if self.kind == "qwen3_vl":
            return conv + self.hidden_size + self.num_position_embeddings * self.hidden_size
        return conv

    @property
    def params(self):
        return self.embed_params() + self.depth * self.block_params() + self.merger_params()

    # What the tower adds to a run of `spec`, for the language model's estimate (estimate/language.py), which
    # reaches the tower through the architecture and imports nothing of this recipe.
    def trainable(self, spec):
        return vision_trainable(self, spec)

    def activation_terms(self, spec, e):
        return vision_activation_terms(self, spec, e)

    def transient_bytes(self, spec, e):
        return vision_transient_bytes(self, spec, e)

    def flops(self, spec):
        return vision_flops(self, spec)

    def describe(self, spec):
        return describe_vision(self, spec)

    def picture(self, spec):
        return picture(self, spec)


def tower_from_config(vision, model_type, pixels=None):
    """A VisionTower from a vision_config mapping (transformers' keys), or None for a tower it does not model."""
    if model_type not in PIXEL_BOUNDS:
        return None
    low, high = pixels or PIXEL_BOUNDS[model_type]
    return VisionTower(
        kind=model_type, depth=int(vision["depth"]), hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]), num_heads=int(vision["num_heads"]),
        patch_size=int(vision["patch_size"]), merge_size=int(vision["spatial_merge_size"]),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        out_hidden_size=int(vision["out_hidden_size"]),
        deepstack=len(vision.get("deepstack_visual_indexes") or ()),
        num_position_embeddings=int(vision.get("num_position_embeddings") or 0),
        window_size=int(vision.get("window_size") or 0),
        full_attention_blocks=len(vision.get("fullatt_block_indexes") or ()), min_pixels=low, max_pixels=high)


def processor_pixel_bounds(directory):
    """(min_pixels, max_pixels) from a model directory's preprocessor_config.json, or None."""
    import json
    from pathlib import Path

    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    size = data.get("size") or {}
    low, high = data.get("min_pixels") or size.get("shortest_edge"), data.get("max_pixels") or size.get("longest_edge")
    return (int(low), int(high)) if low and high else None


# ---------------------------------------------------------------- image tokens

def smart_resize(height, width, factor, min_pixels, max_pixels):
    """The size the Qwen2-VL image processor resizes a picture to: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept (transformers' qwen2_vl smart_resize, without torch)."""
    if max(height, width) / min(height, width) > 200:
        raise EstimateError(f"image {width}x{height}: the processor refuses aspect ratios above 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_bounds(tower, spec):
    return spec.min_pixels or tower.min_pixels, spec.max_pixels or tower.max_pixels


def image_tokens(tower, width, height, min_pixels, max_pixels):
    """Image tokens of a width x height picture: resized patches / merge_size^2."""
    h, w = smart_resize(height, width, tower.factor, min_pixels, max_pixels)
    return (h // tower.patch_size) * (w // tower.patch_size) // tower.merge_size ** 2


def picture(tower, spec):
    """(width, height, tokens, how it was chosen) of the picture the estimate assumes for every image."""
    low, high = pixel_bounds(tower, spec)
    if spec.image_size:
        width, height = spec.image_size
        return width, height, image_tokens(tower, width, height, low, high), "given"
    room = max(1, (spec.max_length - TEXT_TOKENS_PER_ROW) / max(1.0, spec.images_per_row))
    side = math.isqrt(high)
    if image_tokens(tower, side, side, low, high) > room:
        side = max(tower.factor, math.isqrt(int(room)) * tower.factor)
        return side, side, image_tokens(tower, side, side, low, high), "the largest square a row of max_length holds"
    return side, side, image_tokens(tower, side, side, low, high), "a square of max_pixels"


def images_per_micro_batch(spec):
    return spec.micro_batch_size * spec.images_per_row


# ---------------------------------------------------------------- what trains

def vision_lora_sizes(tower, spec):
    """numel of each vision LoRA matrix of one block (lora_vision: the targets that name its linears)."""
    if not spec.lora_vision or spec.mode == "full":
        return []
    linears = tower.block_linears()
    if spec.lora_target_modules not in (None, "all-linear"):
        targets = spec.lora_target_modules
        wanted = {targets} if isinstance(targets, str) else set(targets)
        linears = [linear for linear in linears if linear[0] in wanted]
        if not linears:
            raise EstimateError(f"lora_vision: none of {sorted(wanted)} is a linear layer of the vision tower; its "
                                f"linear layers are {', '.join(n for n, _, _ in tower.block_linears())}")
    return [size for _, fan_in, fan_out in linears for size in (spec.lora_r * fan_in, fan_out * spec.lora_r)]


def vision_trainable(tower, spec):
    """(LoRA parameters on the blocks, merger parameters that train): a full fine-tune trains the mergers only
    with train_merger, as in LoRA modes (where peft's modules_to_save adds a trainable copy of them)."""
    lora = tower.depth * sum(vision_lora_sizes(tower, spec))
    return lora, tower.merger_params() if spec.train_merger else 0


# ---------------------------------------------------------------- memory and FLOPs of a micro-batch

def patches_and_tokens(tower, spec):
    _, _, tokens = picture(tower, spec)[:3]
    images = images_per_micro_batch(spec)
    return images * tokens * tower.merge_size ** 2, images * tokens


def vision_activation_terms(tower, spec, e):
    """Bytes the tower keeps for backward per micro-batch: nothing while it is frozen; each trained merger keeps its
    normalised input, the GELU's input and output (at the folded width) and the norm's input; LoRA on the blocks
    keeps what a block with adapted linears keeps (its input only, under gradient checkpointing)."""
    patches, tokens = patches_and_tokens(tower, spec)
    wide = tower.hidden_size * tower.merge_size ** 2
    terms = {}
    if spec.train_merger:
        terms["vision_mergers"] = tower.mergers * 4 * tokens * wide * e
    if vision_lora_sizes(tower, spec):
        h, inter = tower.hidden_size, tower.intermediate_size
        mlp = 2 * inter if tower.kind == "qwen3_vl" else 3 * inter
        per_block = patches * (8 * h + mlp) * e + patches * spec.lora_r * e * len(vision_lora_sizes(tower, spec)) // 2
        terms["vision_blocks"] = tower.depth * (patches * h * e if spec.gradient_checkpointing else per_block)
        if not spec.train_merger:  # the frozen merger still passes gradients back: it keeps its inputs
            terms["vision_mergers"] = tower.mergers * 3 * tokens * wide * e
    return terms


def vision_transient_bytes(tower, spec, e):
    """The forward's working set: the pixels (fp32 from the processor and their cast), one block's q/k/v, output and
    MLP intermediates over all patches of the micro-batch, the merged image features."""
    patches, tokens = patches_and_tokens(tower, spec)
    pixel_width = 3 * tower.temporal_patch_size * tower.patch_size ** 2
    block = patches * (5 * tower.hidden_size + 2 * tower.intermediate_size) * e
    return patches * pixel_width * (4 + e) + block + tower.mergers * tokens * tower.out_hidden_size * e


def attention_span(tower, patches_per_image):
    """Average patches a patch attends to in a block (Qwen2.5-VL: windows but in its full-attention blocks)."""
    if not tower.window_size:
        return patches_per_image
    window = min(patches_per_image, (tower.window_size // tower.patch_size) ** 2)
    full = tower.full_attention_blocks
    return (full * patches_per_image + (tower.depth - full) * window) / tower.depth


def vision_flops(tower, spec):
    """{forward, backward, recompute} FLOPs of the tower per micro-batch."""
    _, _, tokens = picture(tower, spec)[:3]
    images = images_per_micro_batch(spec)
    per_image = tokens * tower.merge_size ** 2
    block_matmul = sum(i * o for _, i, o in tower.block_linears())
    attention = 4 * per_image * attention_span(tower, per_image) * tower.hidden_size
    embed = 2 * per_image * 3 * tower.temporal_patch_size * tower.patch_size ** 2 * tower.hidden_size
    blocks = tower.depth * (2 * per_image * block_matmul + attention)
    mergers = tower.mergers * 2 * tokens * (tower.merger_linear_params())
    lora = tower.depth * per_image * sum(vision_lora_sizes(tower, spec))
    forward = images * (embed + blocks + mergers + 2 * lora)
    backward = recompute = 0.0
    if spec.train_merger:
        backward += images * mergers  # weight gradients; the merger's input needs none
    if lora:
        backward += images * (tower.depth * (2 * per_image * block_matmul + 2 * attention) + mergers + 4 * lora)
        if spec.gradient_checkpointing:
            recompute = images * (blocks + 2 * lora)
    return {"forward": forward, "backward": backward, "recompute": recompute}


def describe_vision(tower, spec):
    width, height, tokens, how = picture(tower, spec)
    low, high = pixel_bounds(tower, spec)
    trains = ("mergers train" if spec.train_merger else "") + \
        (", LoRA on its blocks" if vision_lora_sizes(tower, spec) else "")
    trains = trains.lstrip(", ") or "frozen: forward only, nothing kept for backward"
    return (f"vision tower ({tower.kind}, {tower.params:,} parameters, in the compute dtype): pictures of "
            f"{width}x{height} ({how}; pixels bounded to [{low}, {high}]) -> {tokens} image tokens each, "
            f"{spec.images_per_row:g} per row; {trains}")
