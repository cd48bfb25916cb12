"""Training over local shards as LAVT, CRIS and CGFormer train: every ref once per epoch.

One item per ref that training can learn from, in a fresh permutation each epoch, dealt to the
ranks exactly as ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=False)`` deals them
(the same generator seeded with ``seed + epoch`` on every rank; the permutation padded with its own
start to a multiple of the rank count; rank r takes positions r, r + ranks, …). Each rank cuts its
share into batches and drops the last incomplete one (their loaders' ``drop_last=True``). A sample
is read directly by its offsets (:mod:`.shard_index`) and one of its sentences drawn from a
generator seeded by (seed, epoch, ref), so batch i of an epoch is the same whatever the number of
loader workers, and a resumed run asks for batch ``start_step`` and gets it.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from .errors import DataError
from .sample import Sample, parse_sample
from .shard_index import IndexedShard, load_index


def epoch_order(count: int, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's refs for the epoch: ``DistributedSampler``'s arithmetic, step for step."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    total = math.ceil(count / world_size) * world_size
    padding = total - count
    order += (order * math.ceil(padding / count))[:padding] if padding > count else order[:padding]
    return order[rank:total:world_size]


def steps_per_epoch(count: int, world_size: int, batch_size: int) -> int:
    return math.ceil(count / world_size) // batch_size


class EpochReader:
    """The trainable refs of a split's local shards, and the batches of an epoch built from them."""

    def __init__(self, shards, index_digests: list[str], text_field: str, expected: int) -> None:
        self.shards: list[IndexedShard] = [load_index(shard, digest) for shard, digest in zip(shards, index_digests)]
        self.text_field = text_field
        self.refs = [(s, position) for s, shard in enumerate(self.shards) for position in shard.trainable(text_field)]
        if len(self.refs) != expected:
            raise DataError(
                f"{shards[0].where}: the shard indexes list {len(self.refs)} refs to train on but the manifest says {expected}; "
                "re-run the same sris prepare command"
            )
        self.handles: dict[int, object] = {}

    def batch(self, refs: list[int], epoch: int, seed: int) -> list[tuple[Sample, str]]:
        """(sample, one of its trainable texts) for each ref number in ``refs``."""
        out = []
        for ref in refs:
            s, position = self.refs[ref]
            handle = self.handles.get(s) or self.handles.setdefault(s, self.shards[s].info.open())
            sample = parse_sample(self.shards[s].read(position, handle), self.shards[s].info.where, self.text_field)
            texts = sample.trainable_texts(self.text_field)
            if not texts:  # the index promised a learnable sample
                raise sample.fail("the index marks it trainable but it has no text to learn from")
            out.append((sample, texts[random.Random(f"sentence:{seed}:{epoch}:{ref}").randrange(len(texts))]))
        return out

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def worker_batches(order: list[int], batch_size: int, steps: int, start_step: int, slot: int, workers: int) -> Iterator[tuple[int, list[int]]]:
    """(batch number, its refs) that loader worker ``slot`` of ``workers`` yields: batches
    start_step + slot, + workers, … — the order in which a DataLoader collects them."""
    for number in range(start_step + slot, steps, workers):
        yield number, order[number * batch_size : (number + 1) * batch_size]
