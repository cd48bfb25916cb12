"""Every ref once per epoch over local shards, as LAVT / CRIS / CGFormer train (DistributedSampler)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections import Counter

import pytest
import torch

from shared_ris import load_recipe
from shared_ris.data import DataError, build_train_loader, prepare_synthetic, read_manifest
from shared_ris.data.epoch_sampler import epoch_order
from shared_ris.data.shard_index import index_name
from shared_ris.tokenizer import Tokenizer

REFS, SHARD_SIZE = 96, 8  # 12 shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("epochs")
    prepare_synthetic(folder, train=REFS, val=4, test=0, size=64, shard_size=SHARD_SIZE, workers=1)
    return folder


def recipe_for(batch: int = 4, seed: int = 0):
    # a small shuffle buffer: what the streaming loader (remote data) would need to mix shards
    return load_recipe("tiny", [f"train.batch_size={batch}", f"train.seed={seed}", "model.image_size=64", "data.shuffle_buffer=4"])


def epoch_keys(data, recipe, epoch: int, world_size: int = 2, workers: int = 2, start_step: int = 0) -> list[list[str]]:
    """The keys of every batch of the epoch, rank by rank."""
    tokenizer = Tokenizer(data / "spm.model", max_len=recipe.model.max_text_len)
    ranks = []
    for rank in range(world_size):
        loader = build_train_loader(data, recipe, tokenizer, rank=rank, world_size=world_size, epoch=epoch, start_step=start_step, num_workers=workers)
        ranks.append([key for batch in loader for key in batch["keys"]])
    return ranks


@pytest.mark.parametrize("count,world_size", [(10, 2), (10, 3), (7, 4), (3, 8)])
@pytest.mark.parametrize("epoch", [0, 5])
def test_the_order_is_distributed_samplers(count, world_size, epoch):
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(range(count), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        assert epoch_order(count, epoch, 3, rank, world_size) == list(sampler)


def test_an_epoch_over_two_ranks_and_two_workers_reads_every_ref_once(data):
    recipe = recipe_for()
    ranks = epoch_keys(data, recipe, epoch=0)
    seen = Counter(key for keys in ranks for key in keys)
    assert len(seen) == REFS and set(seen.values()) == {1}  # 96 = 2 ranks × 12 batches × 4: no remainder here
    assert not set(ranks[0]) & set(ranks[1])
    assert [len(keys) for keys in ranks] == [REFS // 2] * 2


def test_the_remainder_is_padded_then_dropped_like_the_peers(data):
    recipe = recipe_for(batch=5)  # 96 refs over 2 ranks: 48 each, 9 batches of 5, 3 refs of each rank's share dropped
    ranks = epoch_keys(data, recipe, epoch=1)
    assert [len(keys) for keys in ranks] == [45, 45]
    seen = Counter(key for keys in ranks for key in keys)
    assert max(seen.values()) == 1 and len(seen) == 90


def test_the_order_changes_with_the_epoch_and_the_seed_but_not_with_the_workers(data):
    base = epoch_keys(data, recipe_for(), epoch=0)
    assert epoch_keys(data, recipe_for(), epoch=1) != base
    assert epoch_keys(data, recipe_for(seed=1), epoch=0) != base
    assert epoch_keys(data, recipe_for(), epoch=0, workers=0) == base  # a batch is fixed whatever reads it


def test_batches_mix_shards_like_uniform_sampling(data):
    """Mean distinct shards per batch of 4 drawn from 12 shards of 8: uniform sampling without
    replacement gives 12·(1 − C(88, 4) / C(96, 4)) ≈ 3.54; a shard-local stream gives about 1."""
    keys = epoch_keys(data, recipe_for(), epoch=2, world_size=1, workers=0)[0]
    manifest = read_manifest(data)
    shard_of = {}
    for index, name in enumerate(manifest["splits"]["train"]["shards"]):
        for sample in json.loads((data / index_name(name)).read_text())["samples"]:
            shard_of[sample["key"]] = index
    per_batch = [len({shard_of[k] for k in keys[i : i + 4]}) for i in range(0, len(keys), 4)]
    shards = REFS // SHARD_SIZE
    uniform = shards * (1 - math.comb(REFS - SHARD_SIZE, 4) / math.comb(REFS, 4))
    assert statistics.mean(per_batch) > 0.85 * uniform, (statistics.mean(per_batch), uniform)


def test_resuming_at_step_k_continues_the_same_epoch(data):
    recipe = recipe_for()
    whole = epoch_keys(data, recipe, epoch=3)
    resumed = epoch_keys(data, recipe, epoch=3, start_step=5)
    assert [keys[5 * 4 :] for keys in whole] == resumed


def test_a_damaged_index_or_shard_is_one_line(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    name = read_manifest(copy)["splits"]["train"]["shards"][0]
    index = copy / index_name(name)
    index.write_text(index.read_text().replace('"trainable":["sent","raw"]', '"trainable":[]', 1))
    with pytest.raises(DataError, match=f"{index_name(name)}: index does not match the manifest") as info:
        epoch_keys(copy, recipe_for(), epoch=0, world_size=1, workers=0)
    assert "\n" not in str(info.value)
    shutil.copy(data / index_name(name), index)
    shard = copy / name
    content = bytearray(shard.read_bytes())
    content[600] ^= 0xFF  # inside the first member: same size, so only the member digests can tell
    shard.write_bytes(bytes(content))
    with pytest.raises(DataError, match=f"{name}: member .* does not match the index"):
        epoch_keys(copy, recipe_for(), epoch=0, world_size=1, workers=0)


def test_indexing_a_foreign_shard_never_crashes(tmp_path):
    """A malformed sample is marked trainable (the sample check names it); a member without KEY.EXT is one DataError."""
    import io
    import tarfile

    from shared_ris.data.shard_index import build_index

    def shard(members: dict[str, bytes]):
        path = tmp_path / "s.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    malformed = {"a.json": b'{"sentences": ["a string"]}', "b.json": b"not json", "c.json": b'{"sentences": [{"sent": "x"}]}'}
    samples = build_index(shard(malformed))["samples"]
    assert [s["trainable"] for s in samples] == [["sent", "raw"], ["sent", "raw"], ["sent"]]
    with pytest.raises(DataError, match="KEY.EXT"):
        build_index(shard({"nodot": b"x"}))
