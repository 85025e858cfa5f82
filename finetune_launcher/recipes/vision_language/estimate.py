"""The vision-language recipe's part of the estimator (estimate/estimator.py lists what a part gives): its rows
(one conversation each, length-grouped, never packed: batching.py) and the pictures they hold, sampled from the
data; its model is the language model's, with the vision tower's terms (estimate_tower.py) reached through the
architecture, which asks this part for the tower of a model (tower_of, and OFFLINE_MODELS with tower_from_entry:
estimate/architectures.py)."""
import json
from pathlib import Path

from finetune_launcher.estimate.dataset_size import first_lines, local_jsonl, training_examples
from finetune_launcher.estimate.language import estimate_language_model
from finetune_launcher.recipes.vision_language.estimate_table import VL_ARCHITECTURES
from finetune_launcher.recipes.vision_language.estimate_tower import processor_pixel_bounds, tower_from_config

SAMPLE_ROWS = 200
OFFLINE_MODELS = VL_ARCHITECTURES  # the vision-language models of the estimator's offline table


def spec_fields(config):
    return {"packing": False, **dataset_size(config)}


def estimate(spec, calibration=None, device=None):
    """The language model's estimate; the vision tower's terms come with the model's architecture."""
    return estimate_language_model(spec, calibration, device)


def tower_of(config, directory=None):
    """The VisionTower of a transformers config with a vision_config (its processor's pixel bounds from
    `directory`), or None."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    return tower_from_config(vision.to_dict(), config.model_type, processor_pixel_bounds(directory) if directory
                             else None)


def tower_from_entry(entry):
    """The VisionTower of an OFFLINE_MODELS entry (estimate_table.py)."""
    vision = {k: v for k, v in entry["vision"].items() if k != "model_type"}
    pixels = (entry["pixels"]["min_pixels"], entry["pixels"]["max_pixels"])
    return tower_from_config(vision, entry["vision"]["model_type"], pixels)


def dataset_size(config):
    """The rows of a local JSONL (with its mixture's share added), and from a sample of rows of each source the
    pictures per row and their mean size (a picture's header is read, not its pixels). Sources that are not local
    JSONL files leave the estimate's assumptions."""
    mixed = config.get("mix_datasets") or ()
    sources = [(config["dataset"], 1.0 - sum(m["fraction"] for m in mixed))]
    sources += [(m["dataset"], m["fraction"]) for m in mixed]
    main = local_jsonl(sources[0][0])
    if main is None:
        return {}
    found = {"examples": int(training_examples(main, config) / max(sources[0][1], 1e-9))}
    samples = [(_picture_sample(Path(path)), fraction) for path, fraction in sources]
    if all(sample is not None for sample, _ in samples):
        found["images_per_row"] = sum(fraction * len(sizes) / rows for (sizes, rows), fraction in samples)
        sizes = [size for (pictures, _), _ in samples for size in pictures]
        if sizes:
            found["image_size"] = (round(sum(w for w, _ in sizes) / len(sizes)),
                                   round(sum(h for _, h in sizes) / len(sizes)))
    return found


def _picture_sample(path):
    """([(width, height)] of the pictures of the first rows, rows read), or None when the file cannot be read."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in first_lines(path, SAMPLE_ROWS)]
    except json.JSONDecodeError:
        return None
    sizes = [size for row in rows for size in (_picture_size(path.parent, name) for name in _image_names(row))
             if size]
    return sizes, max(1, len(rows))


def _image_names(row):
    """Image paths of a row in either format of data.py: an `images` list, or image items naming their file
    inline."""
    if not isinstance(row, dict):
        return []
    names = list(row.get("images") or [])
    for message in row.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, dict) and item.get("type") == "image":
                names.append(item.get("image", item.get("path")))
    return [name for name in names if isinstance(name, str)]


def _picture_size(base, name):
    from PIL import Image, UnidentifiedImageError

    path = Path(name).expanduser()
    try:
        with Image.open(path if path.is_absolute() else base / path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None  # the launcher's data checks name unreadable pictures
