"""Dataset mixtures: several record lists mixed by fractions of the mixed set, e.g. 70% task data + 30% of a
"retention" pool of other data. Generic over record types (text examples, VL rows, anything).

The first source is the main one: every one of its records is used exactly once. Its size fixes the mixed set's
size (main / main fraction); every other source contributes round(size x fraction) records, drawn without
replacement, or, when the source is too small, all of its records as often as they fit plus a draw for the rest
(repeats only where unavoidable). Deterministic: the draw is a pure function of the seed (pass seed + epoch for a
fresh draw each epoch).
"""
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from finetune_launcher.data.records import DataError

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig

Record = TypeVar("Record")

TOLERANCE = 1e-6


@dataclass
class Mixture:
    records: list       # the mixed records, shuffled
    counts: dict        # source name -> records taken from it
    repeated: dict      # source name -> records beyond the source's size (drawn again), 0 when none

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"counts": dict(self.counts), "repeated": dict(self.repeated)}


def mix_sources(sources: Sequence[tuple[str, Sequence[Any]]], fractions: Sequence[float], seed: int) -> Mixture:
    """sources: [(name, records)], main source first; fractions: one per source, each in (0, 1], summing to 1."""
    check_fractions(sources, fractions)
    (main_name, main), others = sources[0], sources[1:]
    total = len(main) / fractions[0]
    rng = random.Random(seed)
    records = [(main_name, r) for r in main]
    counts, repeated = {main_name: len(main)}, {main_name: 0}
    for (name, pool), fraction in zip(others, fractions[1:]):
        wanted = round(total * fraction)
        taken = draw(pool, wanted, rng)
        records += [(name, r) for r in taken]
        counts[name] = wanted
        repeated[name] = max(0, wanted - len(pool))
    rng.shuffle(records)
    return Mixture([r for _, r in records], counts, repeated)


def draw(pool: Sequence[Record], n: int, rng: random.Random) -> list[Record]:
    """n records of pool: without replacement when n <= len(pool); else whole passes plus a draw for the rest."""
    passes, rest = divmod(n, len(pool))
    return list(pool) * passes + rng.sample(list(pool), rest)


def check_fractions(sources: Sequence[tuple[str, Sequence[Any]]], fractions: Sequence[float]) -> None:
    names = [name for name, _ in sources]
    if len(fractions) != len(sources):
        raise DataError(f"dataset mixture: {len(sources)} datasets ({', '.join(names)}) but {len(fractions)} "
                        f"fractions; give one fraction per dataset")
    if len(set(names)) != len(names):
        raise DataError(f"dataset mixture: dataset names must be distinct, got {names}")
    for name, records in sources:
        if not records:
            raise DataError(f"dataset mixture: dataset {name} has no records")
    for name, fraction in zip(names, fractions):
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise DataError(f"dataset mixture: fraction of {name} is {fraction!r}; each fraction must be in (0, 1]")
    if abs(sum(fractions) - 1) > TOLERANCE:
        raise DataError(f"dataset mixture: fractions {list(fractions)} sum to {sum(fractions):g}; they are shares of "
                        f"the mixed set and must sum to 1 (e.g. 0.7 and 0.3)")


def mix_for_run(cfg: "RunConfig", main: list[Record],
                load_source: Callable[[str], Sequence[Record]]) -> tuple[list[Record], dict[str, Any] | None]:
    """The run's training records with cfg.mix_datasets mixed in: `main` (the main dataset's records, after its eval
    split) plus `load_source(path)` for each mixed dataset, at the fractions the config gives (the main dataset
    makes up the rest). Returns (records, counts for the history, or None without a mixture)."""
    if not cfg.mix_datasets:
        return main, None
    extra = sum(item["fraction"] for item in cfg.mix_datasets)
    if extra >= 1:
        raise DataError(f"mix_datasets: the fractions sum to {extra:g}; the main dataset {cfg.dataset} needs a share "
                        f"too, so keep their sum below 1 (e.g. 0.3 for a 30% retention pool)")
    sources = [(cfg.dataset, main)] + [(item["dataset"], load_source(item["dataset"])) for item in cfg.mix_datasets]
    fractions = [1 - extra] + [item["fraction"] for item in cfg.mix_datasets]
    mixed = mix_sources(sources, fractions, cfg.seed)
    return mixed.records, mixed.as_dict()
