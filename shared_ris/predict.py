"""``sris predict`` as a library call: which files, which texts, which output names, and the
files written (segment-anything's ``scripts/amg.py`` to the :class:`~.predictor.Predictor`)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from .device import check_device
from .errors import SharedRISError
from .predictor import ImageReadError, Predictor, open_image
from .visualize import overlay_attention, overlay_mask, save_mask

# Files with these suffixes are treated as images; anything else in a folder is ignored (and counted).
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .jfif".split())
OUTPUT_MARKERS = (".mask.png", ".overlay.jpg", ".attn_")  # our own outputs, never read back as inputs
ATTENTION_KEYS = ("encoder", "fpn", "decoder")



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
