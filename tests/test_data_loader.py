"""The streaming loaders: exact-once evaluation across ranks × workers, train shapes, determinism, resume."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from refer_fixture import build_refer_fixture
from shard_reading import all_sentences
from shared_ris import Tokenizer, load_recipe
from shared_ris.data import DataError, build_eval_loader, build_train_loader, data_location, prepare_refer, prepare_synthetic, read_manifest
from shared_ris.data.streams import eval_units, make_units, train_units

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
SIZE = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(out, train=90, val=37, test=0, size=SIZE, seed=3, shard_size=16, workers=2)
    return out


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("tiny", [f"model.image_size={SIZE}", "train.batch_size=8", "data.shuffle_buffer=20", "data.num_workers=0"])


@pytest.fixture(scope="module")
def tokenizer(synthetic, recipe):
    return Tokenizer(synthetic / "spm.model", recipe.model.max_text_len)


def fingerprint(batches) -> list:
    return [(b["keys"], b["text_ids"].tolist(), float(b["images"].sum()), float(b["masks"].sum())) for b in batches]


# -- partitioning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards,readers", [(7, 4), (3, 4), (1, 4), (4, 4), (2, 6)])
def test_eval_units_cover_every_slice_once(shards, readers):
    urls = [f"s{i}.tar" for i in range(shards)]
    taken = [u for r in range(readers) for u in eval_units(urls, r, readers)]
    assert sorted(taken) == sorted(make_units(urls, readers))
    assert all(len(eval_units(urls, r, readers)) > 0 for r in range(readers))


def test_train_units_deal_each_pass_once_and_depend_on_epoch():
    urls = [f"s{i}.tar" for i in range(6)]
    first_pass = [u for r in range(3) for u in list(zip(range(2), train_units(urls, r, 3, seed=0, epoch=0)))]
    assert sorted(u for _, u in first_pass) == sorted(make_units(urls, 3))
    take = lambda epoch: [u for _, u in zip(range(12), train_units(urls, 0, 3, seed=0, epoch=epoch))]  # noqa: E731
    assert take(0) == take(0) and take(0) != take(1)


# -- evaluation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,shard_note", [("val", "3 shards < 4 readers: split by sample"), ("train", "6 shards >= 4 readers")])
def test_eval_yields_every_sentence_once_across_2_ranks_x_2_workers(synthetic, recipe, tokenizer, split, shard_note):
    expected = all_sentences(synthetic, split)
    got = Counter()
    for rank in range(2):
        loader = build_eval_loader(synthetic, split, recipe, tokenizer, rank=rank, world_size=2, num_workers=2, batch_size=5)
        for batch in loader:
            got.update(zip(batch["keys"], batch["sent_ids"]))
    assert got == expected, shard_note
    assert max(got.values()) == 1 and sum(got.values()) == read_manifest(synthetic)["splits"][split]["sentences"]


def test_eval_batches_keep_original_masks(synthetic, recipe, tokenizer):
    batch = next(iter(build_eval_loader(synthetic, "val", recipe, tokenizer, num_workers=0, batch_size=6)))
    assert batch["images"].shape == (6, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["text_ids"].shape == batch["text_padding_mask"].shape == (6, recipe.model.max_text_len)
    assert batch["text_padding_mask"].dtype == torch.bool
    assert all(m.dtype == torch.uint8 and m.shape == (SIZE, SIZE) and set(m.unique().tolist()) <= {0, 1} for m in batch["orig_masks"])
    assert all(isinstance(t, str) and t for t in batch["texts"]) and all(isinstance(i, int) for i in batch["sent_ids"])


def test_eval_on_refcoco_shards_original_size_and_text_field(tmp_path, recipe, tokenizer):
    fixture = build_refer_fixture(tmp_path / "src")
    prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path / "out", workers=1)
    raw_recipe = load_recipe("tiny", [f"model.image_size={SIZE}", "data.text_field=raw"])
    seen = 0
    for batch in build_eval_loader(tmp_path / "out", "val", raw_recipe, tokenizer, num_workers=0, batch_size=4):
        for key, mask, text in zip(batch["keys"], batch["orig_masks"], batch["texts"]):
            assert mask.shape == (64, 64) and mask.sum() > 0  # image 4 is 64×64; resized would be SIZE²
            seen += 1
    assert seen == read_manifest(tmp_path / "out")["splits"]["val"]["sentences"]


# -- training -----------------------------------------------------------------------------------------------


def test_train_batches_have_the_recipe_shapes_and_count(synthetic, recipe, tokenizer):
    samples = read_manifest(synthetic)["splits"]["train"]["samples"]
    for rank in range(2):
        loader = build_train_loader(synthetic, recipe, tokenizer, rank=rank, world_size=2, num_workers=2)
        assert len(loader) == samples // (8 * 2)
        batches = list(loader)
        assert len(batches) == len(loader)
    b = batches[0]
    assert b["images"].shape == (8, 3, SIZE, SIZE) and b["images"].dtype == torch.float32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    assert b["masks"].shape == (8, 1, SIZE, SIZE) and b["masks"].dtype == torch.float32
    assert set(b["masks"].unique().tolist()) == {0.0, 1.0}
    assert b["text_ids"].shape == (8, recipe.model.max_text_len) and b["text_ids"].dtype == torch.long
    assert b["text_padding_mask"].dtype == torch.bool and torch.equal(b["text_padding_mask"], b["text_ids"] == 1)
    assert len(b["keys"]) == 8


def test_train_ranks_see_different_samples(synthetic, recipe, tokenizer):
    keys = [{k for b in build_train_loader(synthetic, recipe, tokenizer, rank=r, world_size=2, num_workers=0) for k in b["keys"]} for r in range(2)]
    assert len(keys[0] & keys[1]) < len(keys[0]) // 2


def test_same_seed_same_stream_other_epoch_other_stream(synthetic, recipe, tokenizer):
    run = lambda epoch, workers: fingerprint(build_train_loader(synthetic, recipe, tokenizer, epoch=epoch, num_workers=workers))  # noqa: E731
    first = run(0, 2)
    assert run(0, 2) == first
    assert run(1, 2) != first
    other_seed = load_recipe("tiny", [f"model.image_size={SIZE}", "train.batch_size=8", "data.shuffle_buffer=20", "train.seed=1"])
    assert fingerprint(build_train_loader(synthetic, other_seed, tokenizer, num_workers=2)) != first


@pytest.mark.parametrize("workers,start", [(2, 3), (0, 4), (2, 4)])
def test_start_step_resumes_the_uninterrupted_stream(synthetic, recipe, tokenizer, workers, start):
    full = fingerprint(build_train_loader(synthetic, recipe, tokenizer, epoch=2, num_workers=workers))
    resumed = build_train_loader(synthetic, recipe, tokenizer, epoch=2, start_step=start, num_workers=workers)
    assert len(resumed) == len(full)
    assert fingerprint(resumed) == full[start:]


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_leave_the_global_torch_rng_alone(synthetic, recipe, tokenizer, workers):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_train_loader(synthetic, recipe, tokenizer, num_workers=workers))
    list(build_eval_loader(synthetic, "val", recipe, tokenizer, num_workers=workers))
    assert torch.equal(torch.rand(3), expected)


def test_one_sentence_per_ref_from_the_recipe_field(synthetic, recipe, tokenizer):
    manifest_texts = {}
    for name in read_manifest(synthetic)["splits"]["train"]["shards"]:
        with tarfile.open(synthetic / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    manifest_texts[m.name.split(".")[0]] = [s["sent"] for s in json.loads(tar.extractfile(m).read())["sentences"]]
    for batch in build_train_loader(synthetic, recipe, tokenizer, num_workers=0):
        for key, ids in zip(batch["keys"], batch["text_ids"]):
            assert ids.tolist() in [tokenizer(t, pad_to=recipe.model.max_text_len)[0][0].tolist() for t in manifest_texts[key]]


# -- locations and errors -------------------------------------------------------------------------------------


def test_pipe_template_location(synthetic, recipe, tokenizer):
    with pytest.raises(DataError, match="--allow-pipe"):
        read_manifest(f"pipe:cat {synthetic}/{{}}")  # a shell command runs only when asked for
    location = data_location(f"pipe:cat {synthetic}/{{}}", allow_pipe=True)
    assert read_manifest(location)["dataset"] == "synthetic"
    got = Counter()
    for batch in build_eval_loader(location, "val", recipe, tokenizer, num_workers=0):
        got.update(zip(batch["keys"], batch["sent_ids"]))
    assert got == all_sentences(synthetic, "val")


def test_brace_pattern_shards(synthetic, recipe, tokenizer):
    pattern = f"{synthetic}/synthetic-val-{{000000..000002}}.tar"
    n = sum(len(b["keys"]) for b in build_eval_loader(synthetic, "val", recipe, tokenizer, num_workers=0, shards=pattern))
    assert n == read_manifest(synthetic)["splits"]["val"]["sentences"]


def test_loader_errors_are_one_line(synthetic, recipe, tokenizer, tmp_path):
    with pytest.raises(DataError, match="no samples for split 'test'"):
        build_eval_loader(synthetic, "test", recipe, tokenizer)
    with pytest.raises(DataError, match="run `sris prepare`"):
        build_train_loader(tmp_path, recipe, tokenizer)
    big = load_recipe("tiny", ["train.batch_size=64"])
    with pytest.raises(DataError, match="fewer than one batch"):
        build_train_loader(synthetic, big, tokenizer, world_size=2)
    with pytest.raises(DataError, match="max_len"):
        build_train_loader(synthetic, recipe, Tokenizer(synthetic / "spm.model", 40))


def test_mask_resize_is_nearest_and_image_is_bicubic():
    from shared_ris.data import image_to_tensor, mask_to_tensor

    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 1
    resized = mask_to_tensor(mask, 8)
    assert resized.shape == (1, 8, 8) and set(resized.unique().tolist()) == {0.0, 1.0}
    image = Image.fromarray(np.full((5, 7, 3), 255, np.uint8))
    tensor = image_to_tensor(image, 4)
    assert tensor.shape == (3, 4, 4) and torch.allclose(tensor, torch.ones_like(tensor))
    gray16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    from shared_ris.data import load_image

    assert np.asarray(load_image(gray16)).min() == 255
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert np.asarray(load_image(buffer.getvalue())).min() == 255  # transparent → white background
