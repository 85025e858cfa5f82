"""Data prepared once per launch. The launcher runs the recipe's data preparation (read, check, tokenise, pack:
the recipe table's `rows` part) before any rank starts, and writes the result under the run directory, keyed by the
run's training identity (which holds the data files' fingerprints); every rank then maps the file and reads only
the rows it is dealt. A relaunch with the same identity (a resume, a Slurm requeue) reuses it.

Rows are dicts; their integer-list fields (input_ids, labels, position_ids) are stored column-wise as one flat
int32 array per field plus row offsets (.npy files, memory-mapped on load), everything else (image paths, a
picture's caption) in a pickle beside them."""
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from finetune_launcher.errors import DataError
from finetune_launcher.fsutil import built_into

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig

PREPARED_ENV = "FTL_PREPARED_DATA"  # the launcher's prepared data directory, for the ranks
FORMAT = "finetune-launcher prepared data 1"
TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "mm_token_type_ids")


@dataclass
class PreparedData:
    """A run's rows as every recipe prepares them: training rows, eval rows, counts for the history (`stats`, a
    JSON-ready dict) and what batching needs besides the rows (`extras`, e.g. the pad id)."""
    train_rows: Sequence
    eval_rows: Sequence
    stats: dict
    extras: dict = field(default_factory=dict)


class RowStore(Sequence):
    """Rows kept column-wise: `store[i]` is row i as a dict of lists, like the rows it was made from."""

    def __init__(self, columns: Mapping[str, np.ndarray], offsets: np.ndarray,
                 other: list[dict[str, Any]] | None = None) -> None:
        self.columns, self.offsets, self.other = columns, offsets, other

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> "RowStore":
        rows = list(rows)
        names = [name for name in TOKEN_FIELDS if rows and name in rows[0]]
        lengths = np.array([len(row[names[0]]) for row in rows] if names else [0] * len(rows), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        columns = {name: np.fromiter((t for row in rows for t in row[name]), dtype=np.int32,
                                     count=int(offsets[-1])) for name in names}
        other = [{k: v for k, v in row.items() if k not in names} for row in rows]
        return cls(columns, offsets, other if any(other) else None)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        row = {name: column[start:end].tolist() for name, column in self.columns.items()}
        if self.other is not None:
            row.update(self.other[index])
        return row

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def save(self, directory: Path, name: str) -> dict[str, Any]:
        for column, values in self.columns.items():
            np.save(directory / f"{name}.{column}.npy", values)
        np.save(directory / f"{name}.offsets.npy", self.offsets)
        return {"columns": list(self.columns), "other": self.other}

    @classmethod
    def load(cls, directory: Path, name: str, description: Mapping[str, Any]) -> "RowStore":
        columns = {column: np.load(directory / f"{name}.{column}.npy", mmap_mode="r")
                   for column in description["columns"]}
        return cls(columns, np.load(directory / f"{name}.offsets.npy"), description["other"])


def row_length(rows: Sequence[Mapping[str, Any]], index: int) -> int:
    """Tokens of row `index` of a RowStore or a list of row dicts."""
    return rows.length(index) if isinstance(rows, RowStore) else len(rows[index]["input_ids"])


def storable(rows: Sequence[Any]) -> Sequence[Any]:
    """Rows of dicts with token lists become a RowStore; anything else (a recipe's own collection) is kept as is."""
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "input_ids" in rows[0]:
        return RowStore.from_rows(rows)
    return rows


def save_prepared(prepared: PreparedData, directory: str | Path) -> Path:
    """Write `prepared` into `directory` atomically (another node's launcher may write the same one)."""
    with built_into(directory) as tmp:
        parts = {}
        for name in ("train_rows", "eval_rows"):
            rows = storable(getattr(prepared, name))
            parts[name] = ("store", rows.save(tmp, name)) if isinstance(rows, RowStore) else ("object", rows)
        with open(tmp / "prepared.pkl", "wb") as f:
            pickle.dump({"format": FORMAT, "parts": parts, "stats": prepared.stats, "extras": prepared.extras}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
    return Path(directory)


def load_prepared(directory: str | Path) -> PreparedData:
    directory = Path(directory)
    with open(directory / "prepared.pkl", "rb") as f:
        saved = pickle.load(f)
    if saved.get("format") != FORMAT:
        raise DataError(f"{directory}: prepared data of another version; delete the directory and launch again")
    rows = {name: RowStore.load(directory, name, value) if kind == "store" else value
            for name, (kind, value) in saved["parts"].items()}
    return PreparedData(rows["train_rows"], rows["eval_rows"], saved["stats"], saved["extras"])


def prepared_dir(cfg: "RunConfig", identity: Mapping[str, Any]) -> Path:
    """Where the launch keeps the prepared data of a run with this training identity."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.run_dir) / "prepared" / key


def prepare_once(cfg: "RunConfig", identity: Mapping[str, Any],
                 prepare: Callable[["RunConfig"], PreparedData]) -> tuple[PreparedData, Path]:
    """The run's PreparedData and its directory: loaded when an earlier launch of the same identity wrote it, else
    `prepare(cfg)` and written. Older prepared data of the run (another identity) is removed."""
    directory = prepared_dir(cfg, identity)
    if (directory / "prepared.pkl").is_file():
        return load_prepared(directory), directory
    prepared = prepare(cfg)
    save_prepared(prepared, directory)
    for old in directory.parent.iterdir():
        if old != directory and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return prepared, directory


def require_one_step(rows: int, cfg: "RunConfig", stats: Mapping[str, Any] | None = None) -> None:
    """DataError unless there are enough training rows for one optimizer step on every rank. The message names
    what would make it fit: with packing, several examples share a row, so a smaller micro-batch may not help."""
    needed = cfg.world_size * cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if rows >= needed:
        return
    shape = (f"{cfg.world_size} processes x micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
             f"{cfg.gradient_accumulation_steps} = {needed}")
    examples = (stats or {}).get("train_examples")
    packed = bool((stats or {}).get("packed"))
    if packed and examples:
        per_row = examples / max(rows, 1)
        fix = (f"packing put {examples} examples into {rows} rows of up to {cfg.max_length} tokens; set packing: "
               f"false (one example a row: {examples} rows), add about {int((needed - rows) * per_row) + 1} "
               f"examples, or lower the processes, micro_batch_size or gradient_accumulation_steps")
    else:
        fix = "lower the processes, micro_batch_size or gradient_accumulation_steps, or add data"
    raise DataError(f"{cfg.dataset}: {rows} training rows, fewer than one optimizer step needs ({shape}); {fix}")


def rank_rows(cfg: "RunConfig", prepare: Callable[["RunConfig"], PreparedData]) -> PreparedData:
    """The run's PreparedData on a rank: what the launcher prepared (PREPARED_ENV names its directory; the rows are
    memory-mapped, so a rank reads only those it is dealt), else prepared here (a rank started without our
    launcher); either way checked to hold one optimizer step."""
    directory = os.environ.get(PREPARED_ENV)
    prepared = load_prepared(directory) if directory else prepare(cfg)
    require_one_step(len(prepared.train_rows), cfg, prepared.stats)
    return prepared
