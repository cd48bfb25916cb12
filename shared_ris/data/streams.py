"""Which samples each (rank, worker) reads: pure functions of the shard list and a few integers.

A *unit* is ``(shard, j, k)``: the samples of ``shard`` whose position in it is ``j`` modulo ``k``.
With at least as many shards as readers (ranks × workers) k = 1 and units are whole shards; with
fewer shards every shard is cut into k slices, so nobody idles and nothing is read twice.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Iterable, Iterator

from .errors import DataError
from .shard_reader import ShardInfo, read_shard

Unit = tuple[ShardInfo, int, int]


def make_units(shards: list[ShardInfo], readers: int) -> list[Unit]:
    """Whole shards when there are enough, else every shard cut into ceil(readers / shards) slices."""
    if not shards:
        raise DataError("no shards to read; check the data folder and its manifest.json")
    k = 1 if len(shards) >= readers else math.ceil(readers / len(shards))
    return [(shard, j, k) for shard in shards for j in range(k)]


def eval_units(shards: list[ShardInfo], reader: int, readers: int) -> list[Unit]:
    """The units reader ``reader`` of ``readers`` reads once; together they cover every sample once."""
    return make_units(shards, readers)[reader::readers]


def train_units(shards: list[ShardInfo], reader: int, readers: int, seed: int, epoch: int) -> Iterator[Unit]:
    """An endless stream: passes over all units, each pass in an order fixed by (seed, epoch, pass),
    dealt round-robin to the readers (reader r takes positions r, r + readers, ...)."""
    units = make_units(shards, readers)
    position = 0
    for p in itertools.count():
        order = units.copy()
        random.Random(f"shards:{seed}:{epoch}:{p}").shuffle(order)
        for unit in order:
            if position % readers == reader:
                yield unit
            position += 1


def read_units(units: Iterable[Unit], max_empty: int | None = None) -> Iterator[tuple[dict, str]]:
    """(raw sample, its shard's location) of the units; every shard is verified as it is read
    (:func:`.shard_reader.read_shard`). An endless stream passes ``max_empty`` so that shards
    without any sample fail instead of spinning forever."""
    empty_run = 0
    for shard, j, k in units:
        count = 0
        for index, sample in enumerate(read_shard(shard)):
            if index % k == j:
                count += 1
                yield sample, shard.where
        empty_run = 0 if count else empty_run + 1
        if max_empty is not None and empty_run > max_empty:
            raise DataError(f"{shard.where}: {empty_run} shards in a row held no sample; re-run sris prepare")


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` items; the last one may be shorter."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
