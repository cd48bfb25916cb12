"""Loaders over prepared shards: training batches and evaluation batches.

Training over local shards reads every ref once per epoch in a fresh permutation, dealt to ranks
like ``DistributedSampler`` (:mod:`.epoch_sampler`). Over a remote location (http, pipe:) it streams:
for reader g = rank·W + v of G = world_size·W (W = worker count, at least 1):
shard units in a (seed, epoch)-fixed order dealt round-robin → the refs training can learn from
(flagged ones dropped from their JSON alone: an empty mask, no non-empty text) → shuffle buffer
seeded by (seed, epoch, g, G) → one of their non-empty sentences from a seeded generator → batches
→ decode, resize, tokenise. An epoch is the manifest's ``trainable_samples`` // (batch × ranks) steps.
Batch i of the epoch is batch i // W of virtual worker i % W, which is what PyTorch's DataLoader
hands out in turn; so the stream is a pure function of (seed, epoch, rank, world_size, W),
``start_step=k`` lets each worker skip its share of the first k batches before decoding anything,
and each worker stops after its share of the epoch (no batch is decoded in vain).

Evaluation: each reader takes its units once (see :mod:`.streams`) and yields every sentence,
an empty text (tokenised ``<s></s>``, as LAVT's tokenizer turns it into ``[CLS][SEP]``) or an empty
mask included: the papers' figures are over every expression of the refer API.

Shards are data: each is verified against the manifest as it is read and every sample is checked
(:mod:`.shard_reader`, :mod:`.sample`). A problem found in a loader worker travels to the main
process as a marker batch and is raised there as the same one-line :class:`DataError`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds

from ..config import Recipe
from ..tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from .errors import DataError, short_repr
from .location import DataLocation, data_location
from .manifest import read_manifest, split_info, split_shards
from .sample import Sample, parse_sample
from .epoch_sampler import EpochReader, epoch_order, steps_per_epoch, worker_batches
from .shard_reader import ShardInfo
from .streams import batched, eval_units, make_units, read_units, train_units
from .transforms import image_pixels, image_to_tensor, mask_pixels, normalize_

ERROR = "__error__"  # a batch that carries a worker's DataError to the main process


@dataclass
class StreamSettings:
    """Everything a worker needs, picklable."""

    shards: list[ShardInfo]
    image_size: int
    text_len: int
    text_field: str
    batch_size: int
    rank: int
    world_size: int
    workers: int  # W >= 1: the stream depends on it, even when reading in the main process
    seed: int = 0
    shuffle_buffer: int = 1000
    resize: str = "stretch"  # data.resize: stretch or letterbox
    index_digests: list[str] | None = None  # local shards: read by index, every ref once per epoch
    trainable: int = 0  # refs training learns from (the manifest's count)


def _samples(units, text_field: str, max_empty: int | None = None) -> Iterator[Sample]:
    for raw, where in read_units(units, max_empty):
        yield parse_sample(raw, where, text_field)


def _with_errors_as_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """In a worker: a DataError becomes a last marker batch (a DataLoader would bury it in a traceback)."""
    try:
        yield from batches
    except DataError as exc:
        yield {ERROR: str(exc)}


def _raise_marked_errors(batches) -> Iterator[dict]:
    for batch in batches:
        if ERROR in batch:
            raise DataError(batch[ERROR])
        yield batch


class _TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, settings: StreamSettings, tokenizer: Tokenizer, epoch: int, start_step: int, steps: int) -> None:
        super().__init__()
        self.s, self.tokenizer, self.epoch, self.start_step, self.steps = settings, tokenizer, epoch, start_step, steps

    def __iter__(self) -> Iterator[dict]:
        return _with_errors_as_batches(self._batches())

    def _batches(self) -> Iterator[dict]:
        s = self.s
        info = torch.utils.data.get_worker_info()
        slot = info.id if info else 0
        virtual = (self.start_step + slot) % s.workers
        skip = (self.start_step + slot) // s.workers  # this virtual worker's batches before start_step
        count = len(range(self.start_step + slot, self.steps, s.workers))  # and its batches from there on
        reader, readers = s.rank * s.workers + virtual, s.world_size * s.workers
        name = f"{s.seed}:{self.epoch}:{reader}:{readers}"
        units = train_units(s.shards, reader, readers, s.seed, self.epoch)
        samples = _samples(units, s.text_field, max_empty=10 * len(make_units(s.shards, readers)) + 10)
        samples = _trainable(samples, s.text_field, patience=FLAGGED_PASSES * sum(shard.samples for shard in s.shards))
        samples = wds.shuffle(s.shuffle_buffer, s.shuffle_buffer, rng=random.Random(f"buffer:{name}"))(samples)
        chosen = _pick_sentences(samples, random.Random(f"sentences:{name}"))
        for batch in itertools.islice(batched(chosen, s.batch_size), skip, skip + count):
            yield self._collate(batch)

    def _collate(self, batch: list[tuple[Sample, str]]) -> dict:
        return collate_train(batch, self.s, self.tokenizer)


class _IndexedTrainStream(_TrainStream):
    """Local shards: the epoch's permutation of every trainable ref (:mod:`.epoch_sampler`)."""

    def _batches(self) -> Iterator[dict]:
        s = self.s
        info = torch.utils.data.get_worker_info()
        reader = EpochReader(s.shards, s.index_digests, s.text_field, s.trainable)
        try:
            order = epoch_order(len(reader.refs), self.epoch, s.seed, s.rank, s.world_size)
            for _, refs in worker_batches(order, s.batch_size, self.steps, self.start_step, info.id if info else 0, info.num_workers if info else 1):
                yield collate_train(reader.batch(refs, self.epoch, s.seed), s, self.tokenizer)
        finally:
            reader.close()


def collate_train(batch: list[tuple[Sample, str]], s: StreamSettings, tokenizer: Tokenizer) -> dict:
    """Decode, resize and tokenise (sample, text) pairs into a training batch."""
    size = s.image_size
    images = _batch_tensor((len(batch), 3, size, size), torch.float32)
    masks = _batch_tensor((len(batch), 1, size, size), torch.float32)
    for i, (sample, _) in enumerate(batch):
        image = sample.image()
        normalize_(images[i].copy_(image_pixels(image, size, s.resize)))  # uint8 → float while copying
        masks[i, 0].copy_(mask_pixels(sample.mask(image.size), size, s.resize))
    ids, padding = tokenizer([text for _, text in batch], pad_to=s.text_len)
    no_target = torch.tensor([sample.no_target for sample, _ in batch])  # (B,) the no-target head's labels
    return {"images": images, "text_ids": ids, "text_padding_mask": padding, "masks": masks, "no_target": no_target, "keys": [sample.key for sample, _ in batch]}


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch tensor; in a worker process it is born in shared memory, so handing it to the main
    process copies nothing (what PyTorch's default collate does for the same reason)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)  # the same calls as torch.utils.data's collate_tensor_fn
    return empty.new(empty._typed_storage()._new_shared(math.prod(shape))).resize_(*shape)


# A reader sees about 1/readers of the split per pass over it, and the passes' orders are random:
# FLAGGED_PASSES × the split's samples in a row without one to learn from is then ~20·readers of
# its passes, a run that has odds below e^-20 while any unit of the split holds a learnable sample.
FLAGGED_PASSES = 20


def _trainable(samples: Iterator[Sample], field: str, patience: int) -> Iterator[tuple[Sample, list[str]]]:
    """(sample, its non-empty texts) of the samples training can learn from, judged from the JSON
    alone so that resuming skips them without decoding an image. Flagged samples for ``patience``
    in a row mean a split with nothing to learn from (whatever its manifest claims): an error, not a hang."""
    flagged_run = 0
    for sample in samples:
        texts = sample.trainable_texts(field)
        if texts:
            flagged_run = 0
            yield sample, texts
            continue
        flagged_run += 1
        if flagged_run > patience:
            raise DataError(
                f"{sample.where}: {flagged_run} samples in a row have an empty mask or no non-empty '{field}' text, "
                "nothing to train on; check data.text_field or re-run sris prepare"
            )


def _pick_sentences(samples: Iterator[tuple[Sample, list[str]]], rng: random.Random) -> Iterator[tuple[Sample, str]]:
    """(sample, one of its trainable texts); one draw per sample, so skipping keeps the sequence."""
    for sample, texts in samples:
        yield sample, texts[rng.randrange(len(texts))]


class TrainLoader:
    """An epoch of training batches for one rank: ``len()`` = optimizer steps per epoch.

    Iterating yields batches ``start_step .. len() - 1`` of the epoch (all of them when
    ``start_step`` is 0), the same number on every rank. Re-iterating replays the same epoch;
    call :meth:`set_epoch` to move on.
    """

    def __init__(self, settings: StreamSettings, tokenizer: Tokenizer, steps: int, num_workers: int, epoch: int, start_step: int, samples: int) -> None:
        self.settings, self.tokenizer, self.num_workers = settings, tokenizer, num_workers
        self.steps_per_epoch, self.samples = steps, samples
        self.set_epoch(epoch, start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self.start_step >= self.steps_per_epoch:
            return iter(())
        kind = _TrainStream if self.settings.index_digests is None else _IndexedTrainStream
        stream = kind(self.settings, self.tokenizer, self.epoch, self.start_step, self.steps_per_epoch)
        return _raise_marked_errors(_data_loader(stream, self.num_workers))  # each worker stops after its share


class _EvalStream(torch.utils.data.IterableDataset):
    def __init__(self, settings: StreamSettings, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.s, self.tokenizer = settings, tokenizer

    def __iter__(self) -> Iterator[dict]:
        return _with_errors_as_batches(self._batches())

    def _batches(self) -> Iterator[dict]:
        s = self.s
        info = torch.utils.data.get_worker_info()
        reader, readers = s.rank * s.workers + (info.id if info else 0), s.world_size * s.workers
        items = self._sentences(_samples(eval_units(s.shards, reader, readers), s.text_field))
        for batch in batched(items, s.batch_size):
            ids, padding = encode_eval_texts(self.tokenizer, [item["text"] for item in batch], s.text_len)
            images = _batch_tensor((len(batch), 3, s.image_size, s.image_size), torch.float32)
            yield {
                "images": torch.stack([item["image"] for item in batch], out=images),
                "text_ids": ids,
                "text_padding_mask": padding,
                "orig_masks": [item["mask"] for item in batch],
                "keys": [item["key"] for item in batch],
                "sent_ids": [item["sent_id"] for item in batch],
                "texts": [item["text"] for item in batch],
                "target_counts": [item["target_count"] for item in batch],
            }

    def _sentences(self, samples: Iterator[Sample]) -> Iterator[dict]:
        for sample in samples:
            image = sample.image()
            mask = torch.from_numpy(sample.mask_array(image.size))
            pixels = image_to_tensor(image, self.s.image_size, self.s.resize)
            for sentence in sample.sentences:
                yield {
                    "image": pixels, "mask": mask, "key": sample.key, "sent_id": sentence["sent_id"], "text": sentence[self.s.text_field],
                    "target_count": sample.target_count,
                }  # fmt: skip


def encode_eval_texts(tokenizer: Tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokenizer(texts, pad_to=length)``, except that an empty text becomes ``<s></s>`` instead of
    an error: evaluation scores every expression of the split, as LAVT does (its BERT tokenizer turns
    an empty sentence into ``[CLS][SEP]``). Training never hands one over: it skips them."""
    if all(text.strip() for text in texts):
        return tokenizer(texts, pad_to=length)
    ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        encoded = (tokenizer.encode(text) if text.strip() else [BOS_ID, EOS_ID])[:length]
        ids[row, : len(encoded)] = torch.tensor(encoded)
    return ids, ids == PAD_ID


class EvalLoader:
    """Every sentence of every sample of a split, each once across all ranks × workers."""

    def __init__(self, stream: _EvalStream, num_workers: int, samples: int, sentences: int) -> None:
        self.stream, self.num_workers = stream, num_workers
        self.samples, self.sentences = samples, sentences  # of the whole split, all ranks together

    def __iter__(self) -> Iterator[dict]:
        return _raise_marked_errors(_data_loader(self.stream, self.num_workers))


def _data_loader(stream: torch.utils.data.IterableDataset, num_workers: int) -> torch.utils.data.DataLoader:
    # The streams seed themselves from (seed, epoch, rank, worker). A DataLoader draws a base seed
    # from the global torch RNG each time it starts iterating; its own generator keeps that draw
    # from shifting the model's random stream (drop path) between a fresh and a resumed run.
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _settings(data_dir, split, recipe: Recipe, tokenizer: Tokenizer, rank, world_size, num_workers, batch_size, shards) -> tuple[StreamSettings, dict, int]:
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if tokenizer.max_len > recipe.model.max_text_len:
        raise DataError(
            f"tokenizer max_len {tokenizer.max_len} exceeds model.max_text_len {recipe.model.max_text_len}; "
            f"build it as Tokenizer(path, max_len={recipe.model.max_text_len})"
        )
    location = data_location(data_dir)
    info = split_info(read_manifest(location), split, location)
    shard_list = _shard_list(info, location, shards)
    workers = recipe.data.num_workers if num_workers is None else num_workers
    settings = StreamSettings(
        shards=shard_list,
        image_size=recipe.model.image_size,
        text_len=recipe.model.max_text_len,
        text_field=recipe.data.text_field,
        batch_size=batch_size or recipe.train.batch_size,
        rank=rank,
        world_size=world_size,
        workers=max(1, workers),
        seed=recipe.train.seed,
        shuffle_buffer=max(1, recipe.data.shuffle_buffer),
        resize=recipe.data.resize,
    )
    return settings, info, workers


def _shard_list(info: dict, location: DataLocation, other_urls: str | list[str] | None) -> list[ShardInfo]:
    """The split's shards; ``other_urls`` (a brace pattern or list, in the manifest's order) read the
    same shards from elsewhere and are verified against the same manifest entries."""
    shards = split_shards(info, location)
    if other_urls is None:
        return shards
    urls = wds.shardlists.expand_urls(str(other_urls)) if isinstance(other_urls, (str, Path)) else [str(u) for u in other_urls]
    if len(urls) != len(shards):
        raise DataError(f"shards= lists {len(urls)} URLs but the manifest lists {len(shards)} shards for this split; give one per shard, in order")
    return [ShardInfo(shard.name, url, shard.samples, shard.bytes, shard.sha256) for shard, url in zip(shards, urls)]


def build_train_loader(
    data_dir: str | Path,
    recipe: Recipe,
    tokenizer: Tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_step: int = 0,
    num_workers: int | None = None,
    batch_size: int | None = None,
    shards: str | list[str] | None = None,
) -> TrainLoader:
    """Training batches of ``recipe.data.train_split`` for one DDP rank.

    Args:
        data_dir: a prepared folder, or a :class:`~.location.DataLocation` (http(s) prefix or
            template, or an opted-in ``pipe:`` template).
        recipe: image size, text length, text field, shuffle buffer, seed, batch size, workers.
        tokenizer: a :class:`~shared_ris.Tokenizer` whose ``max_len`` is at most ``model.max_text_len``.
        rank, world_size: this process's place in DDP.
        epoch: selects the permutation (local shards) or the shard order and shuffles (remote);
            start_step: first batch to yield (resume).
        num_workers: DataLoader workers (default ``recipe.data.num_workers``; 0 = main process).
        batch_size: per rank (default ``recipe.train.batch_size``).
        shards: other URLs for the same shards, in the manifest's order (brace pattern, list,
            ``pipe:`` commands); verified against the manifest like the shards themselves.

    Batches: ``images`` (B, 3, S, S) float32 normalised, ``text_ids`` (B, T) long,
    ``text_padding_mask`` (B, T) bool (True = pad), ``masks`` (B, 1, S, S) float32 in {0, 1},
    ``keys`` list[str]; S = ``model.image_size``, T = ``model.max_text_len``.
    """
    settings, info, workers = _settings(data_dir, recipe.data.train_split, recipe, tokenizer, rank, world_size, num_workers, batch_size, shards)
    trainable = trainable_samples(info, settings.text_field, data_dir)
    indexed = data_location(data_dir).is_local and shards is None
    if indexed:
        settings.index_digests, settings.trainable = info["shard_index_sha256"], trainable
    steps = _epoch_steps(trainable, world_size, settings.batch_size, indexed)
    if steps == 0:
        flagged = f" ({info['samples'] - trainable} of {info['samples']} flagged: empty mask or no '{settings.text_field}' text)" if trainable < info["samples"] else ""
        raise DataError(
            f"{data_dir}: split '{recipe.data.train_split}' has {trainable} samples to train on{flagged}, fewer than one batch "
            f"({settings.batch_size} x {world_size} ranks); lower train.batch_size"
        )
    return TrainLoader(settings, tokenizer, steps, workers, epoch, start_step, trainable)


def build_eval_loader(
    data_dir: str | Path,
    split: str,
    recipe: Recipe,
    tokenizer: Tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    batch_size: int | None = None,
    shards: str | list[str] | None = None,
) -> EvalLoader:
    """Every sentence of every sample of ``split``, once across all ranks and workers.

    Batches: ``images``, ``text_ids``, ``text_padding_mask`` as in training, plus ``orig_masks``
    (list of (H_i, W_i) uint8 tensors in {0, 1} at the original image size), ``keys`` list[str],
    ``sent_ids`` list[int], ``texts`` list[str]. The last batch of each worker may be smaller.
    """
    settings, info, workers = _settings(data_dir, split, recipe, tokenizer, rank, world_size, num_workers, batch_size, shards)
    return EvalLoader(_EvalStream(settings, tokenizer), workers, info["samples"], info["sentences"])


def train_steps_per_epoch(data_dir: str | Path, recipe: Recipe, world_size: int = 1, batch_size: int | None = None) -> int:
    """Batches per epoch per rank, from the manifest alone (an optimizer step takes ``train.accumulate_steps`` of them)."""
    info = split_info(read_manifest(data_dir), recipe.data.train_split, data_dir)
    trainable = trainable_samples(info, recipe.data.text_field, data_dir)
    return _epoch_steps(trainable, world_size, batch_size or recipe.train.batch_size, data_location(data_dir).is_local)


def _epoch_steps(trainable: int, world_size: int, batch_size: int, indexed: bool) -> int:
    """Local shards read by index: each rank's padded share in whole batches (``DistributedSampler``);
    a remote stream: refs as the shuffle buffers hand them out, in whole global batches."""
    return steps_per_epoch(trainable, world_size, batch_size) if indexed else trainable // (batch_size * world_size)


def trainable_samples(info: dict, text_field: str, where) -> int:
    """The refs of a split training learns from (the manifest's ``trainable_samples[text_field]``):
    an epoch covers each once. A folder prepared before the flags existed had dropped the flagged
    refs already, so its sample count is that number."""
    recorded = info.get("trainable_samples")
    if recorded is None:
        return info["samples"]
    count = recorded.get(text_field) if isinstance(recorded, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= info["samples"]:
        raise DataError(
            f"{where}: 'trainable_samples' must give a count of at most the split's {info['samples']} samples "
            f"for '{text_field}', got {short_repr(recorded)}; re-run sris prepare with --overwrite"
        )
    return count
