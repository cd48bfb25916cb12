"""Shared test helpers for evaluation and prediction: a tiny trained-format run and a zoo of images.

Imported by the test modules (``from fixtures_predict import ...``) rather than living in
conftest.py, so other suites' fixtures stay independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shared_ris
from shared_ris.checkpoint import save_trained
from shared_ris.data.synthetic import export_examples, prepare_synthetic, train_tokenizer


def make_trained_run(folder: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """Write ``folder/best.pt`` (a tiny model with random weights, in sris train's format) and
    ``folder/spm.model`` beside it; return the checkpoint path."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = shared_ris.load_recipe("tiny", list(overrides))
    torch.manual_seed(seed)
    model = shared_ris.build_model(recipe)
    checkpoint = save_trained(model, recipe, folder / "best.pt", epoch=1, step=10)
    train_tokenizer(folder / "spm.model")
    return checkpoint


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Path of a tiny trained-format checkpoint with ``spm.model`` beside it."""
    return make_trained_run(tmp_path_factory.mktemp("run"))


# A short run that learns real masks in about a minute on 2 cores: the tiny recipe at 64 px (4×4
# patches) on 600 synthetic scenes, batch 16. Random weights give masks of noise on which no
# comparison between runtimes means anything; this model's masks follow the shapes.
SHORT_RUN = ("model.image_size=64", "train.max_steps=300", "train.batch_size=16", "train.warmup_steps=20",
             "train.eval_every=1000", "train.log_every=100", "data.shuffle_buffer=200")  # fmt: skip


def train_short_run(folder: Path) -> Path:
    """Prepare ``folder/data`` (synthetic, 64 px), train :data:`SHORT_RUN` into ``folder/run`` with
    ``shared_ris.train.train`` (so the run folder is a real one: recipe, tokenizer copy, metrics,
    checkpoints) and write 8 held-out scenes with a prompt each to ``folder/examples``
    (``prompts.jsonl``). Returns ``folder/run/best.pt``."""
    from shared_ris.train import train

    prepare_synthetic(folder / "data", train=600, val=60, test=0, size=64, workers=1)
    train(shared_ris.load_recipe("tiny", list(SHORT_RUN)), folder / "data", folder / "run")
    export_examples(folder / "examples", count=8, size=64)
    return folder / "run" / "best.pt"


_short_runs: list[Path] = []  # trained once per session, whichever test modules import the fixture


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Path:
    """``best.pt`` of :func:`train_short_run` (``../../data``, ``../../examples`` beside its run folder)."""
    if not _short_runs:  # each importing module registers its own fixture; they share one run
        _short_runs.append(train_short_run(tmp_path_factory.mktemp("short_run")))
    return _short_runs[0]


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image with some structure (so overlays and masks are not trivially uniform)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                             np.full((height, width, 1), 90, np.float32)], axis=2)  # fmt: skip
    return Image.fromarray(pixels.astype(np.uint8))


def image_folder(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """``folder`` (created) holding a :func:`gradient` image of (width, height) per relative name."""
    for name, (width, height) in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        gradient(width, height).save(folder / name)
    return folder


def write_image_zoo(folder: Path) -> dict[str, Path]:
    """Every input kind ``sris predict`` must accept or reject, by name.

    Readable: ``exif`` (JPEG 40×24 stored, EXIF orientation 6 → 24×40 upright), ``gray``, ``rgba``,
    ``palette``, ``png16`` (16-bit grayscale), ``cmyk`` (CMYK JPEG). Unreadable: ``truncated``
    (a JPEG cut short), ``fake`` (text named .jpg). Not an image: ``notes`` (.txt).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    paths["exif"] = folder / "exif.jpg"
    gradient(40, 24).save(paths["exif"], exif=exif.tobytes())
    paths["gray"] = folder / "gray.png"
    gradient(30, 20).convert("L").save(paths["gray"])
    paths["rgba"] = folder / "rgba.png"
    rgba = gradient(32, 32).convert("RGBA")
    rgba.putalpha(Image.new("L", (32, 32), 0))  # fully transparent: must come out white, not black
    rgba.save(paths["rgba"])
    paths["palette"] = folder / "palette.gif"
    gradient(24, 24).convert("P", palette=Image.ADAPTIVE, colors=16).save(paths["palette"])
    paths["png16"] = folder / "png16.png"
    Image.fromarray(np.full((20, 26), 32896, dtype=np.uint16)).save(paths["png16"])  # 32896 / 257 = 128
    paths["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (28, 20), (0, 255, 255, 0)).save(paths["cmyk"])  # red
    paths["truncated"] = folder / "truncated.jpg"
    full = folder / "full.tmp"
    gradient(64, 64).save(full, format="JPEG")
    paths["truncated"].write_bytes(full.read_bytes()[:300])
    full.unlink()
    paths["fake"] = folder / "fake.jpg"
    paths["fake"].write_text("this is not a JPEG")
    paths["notes"] = folder / "notes.txt"
    paths["notes"].write_text("not an image either")
    return paths


READABLE = ("exif", "gray", "rgba", "palette", "png16", "cmyk")
UNREADABLE = ("truncated", "fake")
