"""How every recipe deals a run's training rows out to the ranks: one seeded order per epoch, the same on every
rank, so the micro-batches of (epoch, step) are a pure function of the seed, the rank and the step and a resume
needs only the step counter. `ShardedSampler` deals each rank its own slice of the order; the vision-language
recipe's length-grouped sampler deals the same order differently (its module says how)."""
import hashlib
import random


def mixed_seed(*parts: object) -> int:
    """A 63-bit seed from integers and words, the same on every machine and Python (no hash randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order of `count` rows in `epoch`: one shuffle per epoch, the same on every rank."""
    order = list(range(count))
    random.Random(mixed_seed(seed, "epoch", epoch)).shuffle(order)
    return order


def steps_per_epoch(rows: int, world: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over `rows` (each rank gets rows // world of them; the remainder is not used)."""
    return rows // world // (micro_batch_size * accumulation)


class ShardedSampler:
    """Each rank takes every world-th row of the epoch's order, then consecutive micro-batches of its share.
    `micro_batches(epoch, step)` -> this rank's micro-batches of one optimizer step, each a list of row indices
    (the Sampler contract of finetune_launcher/task.py; `rows_of` maps them to rows)."""

    def __init__(self, count: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int,
                 seed: int) -> None:
        self.count, self.rank, self.world = count, rank, world_size
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum, seed
        self.rows_per_rank = count // world_size
        self.steps_per_epoch = steps_per_epoch(count, world_size, micro_batch_size, grad_accum)
        self._order = (None, None)  # (epoch, this rank's indices in it): shuffled once per epoch, not per step

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        mine = self.epoch_share(epoch)
        start = step_in_epoch * self.micro * self.accum
        return [mine[start + k * self.micro: start + (k + 1) * self.micro] for k in range(self.accum)]

    def epoch_share(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            order = epoch_order(self.count, self.seed, epoch)
            self._order = (epoch, order[self.rank::self.world][: self.rows_per_rank])
        return self._order[1]
