"""Prediction on the user's own images: a :class:`Predictor` (load once, ask many) and
:func:`predict_folder`, the library side of ``sris predict``.

The predictor owns the image↔model resizing, as segment-anything's does: an image is resized once
to S×S (bicubic, mean = std = 0.5, as BEiT-3 fine-tuning does), and the mask logits are resized
bilinearly back to the image's own size and thresholded at the recipe's τ.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint_io import load_run
from .data.transforms import image_to_tensor, load_image
from .errors import SharedRISError
from .evaluate import upsample_probabilities
from .model import SharedRIS
from .tokenizer import Tokenizer
from .visualize import overlay_attention, overlay_mask, save_mask

# Files with these suffixes are treated as images; anything else in a folder is ignored (and counted).
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .jfif".split())
OUTPUT_MARKERS = (".mask.png", ".overlay.jpg", ".attn_")  # our own outputs, never read back as inputs
ATTENTION_KEYS = ("encoder", "fpn", "decoder")


class ImageReadError(SharedRISError):
    """An image file that cannot be decoded; ``reason`` says why, without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def open_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, rotated as its EXIF orientation says.

    Grayscale, RGBA / LA / transparent palette (composited on white), palette, 16-bit (scaled to
    8 bits, not clipped) and CMYK inputs all come out as RGB. An unreadable file raises
    :class:`ImageReadError`, whose message is one line naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as raw:
            return load_image(raw)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(path, f"cannot read image ({detail})") from None


@dataclass
class Prediction:
    """One (image, expression) result.

    Attributes:
        mask: (H, W) bool at the image's own size.
        mean_prob: mean σ over the mask's pixels (0.0 when the mask is empty).
        low_res_probs: (S/4, S/4) float32 probabilities at the model's output size.
        attention: {"encoder", "fpn", "decoder"} → (g, g) text-cls attention over the patches, when asked.
    """

    mask: np.ndarray
    mean_prob: float
    low_res_probs: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class Predictor:
    """Segment what a text refers to in images.

    Args:
        model: a trained :class:`SharedRIS` (put in eval mode here).
        tokenizer: the tokenizer the model was trained with.
        device: where the model runs; the model is moved there.
        threshold: τ on σ(logits); ``None`` uses ``model.threshold`` (the recipe's).
    """

    def __init__(self, model: SharedRIS, tokenizer: Tokenizer, device: str | torch.device = "cpu", threshold: float | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.threshold = model.threshold if threshold is None else threshold

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tokenizer: str | Path | None = None, device: str = "cpu") -> "Predictor":
        """Load a trained run (see :func:`shared_ris.checkpoint_io.load_run` for the tokenizer search)."""
        check_device(device)
        model, _, text_tokenizer = load_run(checkpoint, tokenizer, device=device)
        return cls(model, text_tokenizer, device)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, S, S) float32 input: one bicubic resize, mean = std = 0.5."""
        return image_to_tensor(image, self.image_size)

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → ids (B, T), padding mask (B, T) True = pad; too-long texts are truncated."""
        return self.tokenizer(list(texts))

    def postprocess(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(1, h, w) logits → (mask bool (H, W), mean σ inside the mask) at ``size`` = (H, W).

        One float map at full size is alive at a time: resize, sigmoid and masking run in place.
        """
        probs = upsample_probabilities(logits, size)
        mask = probs > self.threshold
        area = int(mask.sum())
        mean_prob = float(probs.mul_(mask).sum() / area) if area else 0.0
        return mask.numpy(), mean_prob

    @torch.no_grad()
    def predict_tensors(
        self, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], texts: Sequence[str], attention: bool = False
    ) -> list[Prediction]:
        """Preprocessed images (B, 3, S, S), their original (H, W) and one text each → predictions."""
        if not (len(pixels) == len(sizes) == len(texts)):
            raise ValueError(f"got {len(pixels)} images, {len(sizes)} sizes and {len(texts)} texts")
        ids, padding = self.encode_texts(texts)
        out = self.model(pixels.to(self.device), ids.to(self.device), padding.to(self.device), return_attention=attention)
        logits, maps = out if attention else (out, {})
        logits = logits.float().cpu()
        maps = {k: v.float().cpu().numpy() for k, v in maps.items()}
        results = []
        for i, size in enumerate(sizes):
            mask, mean_prob = self.postprocess(logits[i], size)
            results.append(Prediction(mask, mean_prob, logits[i, 0].sigmoid().numpy(), {k: v[i] for k, v in maps.items()}))
        return results

    def predict(self, images: Sequence[Image.Image], texts: Sequence[str] | str, attention: bool = False) -> list[Prediction]:
        """RGB images and one text each (or one text for all) → one :class:`Prediction` per image."""
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.predict_tensors(pixels, [(image.height, image.width) for image in images], texts, attention)


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SharedRISError(f"--device {device} asked for, but CUDA is not available; use --device cpu")


# ---------------------------------------------------------------------------------------------
# Folder prediction: which files, which texts, which output names


@dataclass
class Job:
    """One input image and the texts to segment in it."""

    path: Path
    name: str  # output stem, relative to the output folder (keeps sub-folders when recursive)
    label: str  # the file as written to predictions.jsonl (relative to the input folder)
    texts: list[str]


@dataclass
class PredictSummary:
    out_dir: Path
    predictions: int = 0
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): failed to read
    ignored: list[str] = field(default_factory=list)  # files without an image suffix

    @property
    def jsonl(self) -> Path:
        return self.out_dir / "predictions.jsonl"


def check_text(text: str, where: str = "") -> str:
    if not isinstance(text, str) or not text.strip():
        raise SharedRISError(f"empty referring expression{where}; give a non-empty text such as 'the red cup'")
    return text


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """A prompts file → [(file, text)]: JSON lines ``{"file": ..., "text": ...}`` or a CSV with a
    ``file,text`` header. ``predictions.jsonl`` from an earlier run is a valid prompts file."""
    path = Path(path)
    if not path.is_file():
        raise SharedRISError(f"{path}: prompts file not found")
    pairs: list[tuple[str, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
                raise SharedRISError(f"{path}: a prompts CSV needs a header with the columns file,text")
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = ((n, _json_line(path, n, line)) for n, line in enumerate(handle, 1) if line.strip())
        for line_no, row in rows:
            if not isinstance(row, dict) or not row.get("file"):
                raise SharedRISError(f"{path}:{line_no}: each prompt needs a 'file' and a 'text'")
            pairs.append((str(row["file"]), check_text(row.get("text") or "", f" in {path}:{line_no}")))
    if not pairs:
        raise SharedRISError(f"{path}: no prompts in the file")
    return pairs


def _json_line(path: Path, line_no: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise SharedRISError(f"{path}:{line_no}: not valid JSON ({exc.msg}); use one {{\"file\": ..., \"text\": ...}} per line") from None


def _is_output(path: Path) -> bool:
    return path.name == "predictions.jsonl" or any(marker in path.name for marker in OUTPUT_MARKERS)


def list_inputs(
    path: Path, recursive: bool, out_dir: Path, prompts_file: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(images, ignored): files under ``path`` with an image suffix, sorted, and the other files.
    Our own output files, the prompts file and an output folder inside ``path`` are left out of both."""
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise SharedRISError(f"{path}: no such file or folder")
    out_dir, root = out_dir.resolve(), path.resolve()
    inside = out_dir != root and root in out_dir.parents  # an output folder below the inputs is skipped
    prompts = prompts_file.resolve() if prompts_file is not None else None
    images, ignored = [], []
    for file in sorted(path.rglob("*") if recursive else path.iterdir()):
        if not file.is_file() or _is_output(file):
            continue
        resolved = file.resolve()
        if (inside and out_dir in resolved.parents) or resolved == prompts:  # prompts kept beside their images
            continue
        (images if file.suffix.lower() in IMAGE_SUFFIXES else ignored).append(file)
    return images, ignored


def plan_jobs(
    path: Path,
    text: str | None,
    prompts: list[tuple[str, str]] | None,
    recursive: bool,
    out_dir: Path,
    prompts_file: Path | None = None,
) -> tuple[list[Job], list[Path], list[tuple[str, str]]]:
    """Pair images with texts and give every output a distinct name.

    Without prompts every image gets ``text``. With prompts, each listed file gets its prompts (in
    file order), and images the prompts do not name get ``text`` if one was given; ``prompts_file``
    (where the prompts came from) is never an input. Returns (jobs, ignored non-image files,
    prompts naming missing files as (file, reason)).
    """
    root = path if path.is_dir() else path.parent
    images, ignored = list_inputs(path, recursive, out_dir, prompts_file)
    texts: dict[Path, list[str]] = {image: [] for image in images}
    missing: list[tuple[str, str]] = []
    for file, prompt in prompts or []:
        target = Path(file) if Path(file).is_absolute() else root / file
        if target in texts:
            texts[target].append(prompt)
        elif target.is_file():
            texts.setdefault(target, []).append(prompt)
        else:
            missing.append((file, "file named in the prompts not found"))
    for image, listed in texts.items():
        if not listed and text is not None:
            listed.append(text)
    stems: dict[Path, int] = {}
    for image in texts:
        key = _relative(image, root).with_suffix("")
        stems[key] = stems.get(key, 0) + 1
    jobs = []
    for image, listed in texts.items():
        if not listed:
            continue
        relative = _relative(image, root)
        stem = relative.with_suffix("")
        if stems[stem] > 1:  # cup.jpg and cup.png in one folder: cup_jpg, cup_png
            stem = stem.with_name(f"{stem.name}_{image.suffix.lstrip('.').lower()}")
        jobs.append(Job(image, stem.as_posix(), relative.as_posix(), listed))
    return jobs, ignored, missing


def _relative(file: Path, root: Path) -> Path:
    try:
        return file.relative_to(root)
    except ValueError:  # an absolute path in the prompts, outside the folder
        return Path(file.name)


def output_names(job: Job) -> Iterator[tuple[str, str]]:
    """(text, output stem) per text: ``NAME`` for one text, ``NAME.0``, ``NAME.1``, … for several."""
    if len(job.texts) == 1:
        yield job.texts[0], job.name
    else:
        for i, text in enumerate(job.texts):
            yield text, f"{job.name}.{i}"


@dataclass
class _Pending:
    job: Job
    image: Image.Image
    pixels: torch.Tensor
    text: str
    stem: str


def predict_folder(
    path: str | Path,
    text: str | None,
    checkpoint: str | Path,
    *,
    out_dir: str | Path,
    prompts: str | Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    attention: bool = False,
    recursive: bool = False,
    tokenizer: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Segment ``text`` (or the prompts file's texts) in one image or every image of a folder.

    Writes, under ``out_dir``: ``NAME.mask.png`` (0/255, original size), ``NAME.overlay.jpg`` (mask
    tinted over the image), with ``attention`` also ``NAME.attn_{encoder,fpn,decoder}.jpg``, and
    ``predictions.jsonl`` (rewritten each run: file, text, mask_area, mean_prob, height, width and
    the output paths). Images that cannot be read are skipped and listed in ``summary.skipped``;
    files without an image suffix are ignored (``summary.ignored``). ``progress(done, total)`` is
    called per image, ``warn(message)`` for truncated texts.
    """
    path, out_dir = Path(path), Path(out_dir)
    if batch_size < 1:
        raise SharedRISError(f"--batch-size must be at least 1, got {batch_size}")
    if text is None and prompts is None:
        raise SharedRISError("give a TEXT such as 'the red cup' or a --prompts FILE")
    if text is not None:
        check_text(text)
    check_device(device)
    prompts_file = Path(prompts) if prompts is not None else None
    pairs = read_prompts(prompts_file) if prompts_file is not None else None
    jobs, ignored, missing = plan_jobs(path, text, pairs, recursive, out_dir, prompts_file)
    predictor = Predictor.from_checkpoint(checkpoint, tokenizer, device)
    for distinct in dict.fromkeys(t for job in jobs for t in job.texts):
        if predictor.tokenizer.is_truncated(distinct) and warn is not None:
            limit = predictor.tokenizer.max_len - 2
            warn(f"text {distinct!r} is longer than {limit} tokens; only its first {limit} are used")

    summary = PredictSummary(out_dir, skipped=list(missing), ignored=[str(f) for f in ignored])
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: list[_Pending] = []
    with summary.jsonl.open("w", encoding="utf-8") as jsonl:
        for done, job in enumerate(jobs, 1):
            try:
                image = open_image(job.path)
            except ImageReadError as exc:
                summary.skipped.append((str(job.path), exc.reason))
            else:
                pixels = predictor.preprocess(image)
                for prompt, stem in output_names(job):
                    pending.append(_Pending(job, image, pixels, prompt, stem))
                    if len(pending) == batch_size:
                        _flush(predictor, pending, attention, summary, jsonl)
                del image, pixels
            if progress is not None:
                progress(done, len(jobs))
        _flush(predictor, pending, attention, summary, jsonl)
    return summary


def _flush(predictor: Predictor, pending: list[_Pending], attention: bool, summary: PredictSummary, jsonl) -> None:
    """Predict the pending (image, text) pairs as one batch, write their files and empty the list."""
    if not pending:
        return
    pixels = torch.stack([p.pixels for p in pending])
    sizes = [(p.image.height, p.image.width) for p in pending]
    predictions = predictor.predict_tensors(pixels, sizes, [p.text for p in pending], attention)
    for item, pred in zip(pending, predictions):
        base = summary.out_dir / item.stem
        base.parent.mkdir(parents=True, exist_ok=True)
        files = {"mask": base.with_name(base.name + ".mask.png"), "overlay": base.with_name(base.name + ".overlay.jpg")}
        save_mask(pred.mask, files["mask"])
        overlay_mask(item.image, pred.mask).save(files["overlay"], quality=90)
        for key in ATTENTION_KEYS:
            if key in pred.attention:
                files[f"attn_{key}"] = base.with_name(f"{base.name}.attn_{key}.jpg")
                overlay_attention(item.image, pred.attention[key]).save(files[f"attn_{key}"], quality=90)
        record = {
            "file": item.job.label,
            "text": item.text,
            "mask_area": pred.area,
            "mean_prob": round(pred.mean_prob, 6),
            "height": item.image.height,
            "width": item.image.width,
            **{k: v.relative_to(summary.out_dir).as_posix() for k, v in files.items()},
        }
        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        summary.written.extend(files.values())
        summary.predictions += 1
    pending.clear()
