"""``sris predict`` as a library call: which files, which texts, which output names, and the
files written (segment-anything's ``scripts/amg.py`` to the :class:`~.predictor.Predictor`)."""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from PIL import Image

from .errors import SharedRISError
from .fileio import UnsafePathError, check_output_folder, confined
from .predictor import DEFAULT_MAX_PIXELS, ImageReadError, Prediction, Predictor, check_inference_options, open_image
from .visualize import overlay_attention, overlay_mask, save_mask

# Files with these suffixes are treated as images; anything else in a folder is ignored (and counted).
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .jfif".split())
OUTPUT_MARKERS = (".mask.png", ".overlay.jpg", ".attn_")  # our own outputs, never read back as inputs
ATTENTION_KEYS = ("encoder", "fpn", "decoder")
OUTPUT_SUFFIXES = (".mask.png", ".overlay.jpg", *(f".attn_{key}.jpg" for key in ATTENTION_KEYS))
# A batch is flushed early once its (image, text) pairs would hold more decoded pixels than this
# (one 8192×8192 image, or five 12 MP photos): each pair keeps an RGB image and gets a full-size mask.
DEFAULT_BATCH_PIXELS = 8192 * 8192


@dataclass
class Job:
    """One input image and the texts to segment in it."""

    path: Path
    name: str  # output stem, relative to the output folder (keeps sub-folders when recursive)
    label: str  # the file as written to predictions.jsonl (relative to the input folder)
    texts: list[str]


@dataclass
class PromptEntry:
    """One line of a prompts file; ``where`` is ``FILE:LINE``, for messages."""

    file: str
    text: str
    where: str


@dataclass
class PredictSummary:
    out_dir: Path
    predictions: int = 0
    no_target: int = 0  # predictions decided "names nothing" (empty masks)
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): unreadable or over --max-pixels
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
    ``file,text`` header, in UTF-8. ``predictions.jsonl`` from an earlier run is a valid prompts file."""
    return [(entry.file, entry.text) for entry in read_prompt_entries(path)]


def read_prompt_entries(path: str | Path) -> list[PromptEntry]:
    """:func:`read_prompts` with each entry's ``FILE:LINE``. Every error is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise SharedRISError(f"{path}: prompts file not found")
    content = _read_utf8(path)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, content)
    else:
        lines = enumerate(io.StringIO(content, newline=""), 1)  # only \n and \r end a line, as JSON wants
        rows = [(n, _json_line(path, n, line)) for n, line in lines if line.strip()]
    entries = [_prompt_entry(f"{path}:{line_no}", row) for line_no, row in rows]
    if not entries:
        raise SharedRISError(f"{path}: no prompts in the file")
    return entries


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (as spreadsheets write) is dropped
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SharedRISError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the prompts file as UTF-8") from None


def _csv_rows(path: Path, content: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
            raise SharedRISError(f"{path}: a prompts CSV needs a header with the columns file,text")
        # a missing cell is an empty one; every cell a CSV holds is a string
        return [(reader.line_num, {key: row.get(key) or "" for key in ("file", "text")}) for row in reader]
    except csv.Error as exc:
        raise SharedRISError(f"{path}:{reader.line_num}: not valid CSV ({exc}); write one file,text pair per line") from None


def _json_line(path: Path, line_no: int, line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:  # ValueError: a number of more than 4300 digits
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply or too long a number"
        raise SharedRISError(f"{path}:{line_no}: not valid JSON ({reason}); use one {{\"file\": ..., \"text\": ...}} per line") from None


def _prompt_entry(where: str, row) -> PromptEntry:
    if not isinstance(row, dict) or "file" not in row or "text" not in row:
        raise SharedRISError(f"{where}: each prompt needs a 'file' and a 'text'")
    for key in ("file", "text"):
        if not isinstance(row[key], str):
            raise SharedRISError(f"{where}: '{key}' must be a string, got {_json_kind(row[key])}")
    if not row["file"]:
        raise SharedRISError(f"{where}: each prompt needs a 'file' and a 'text'")
    return PromptEntry(row["file"], check_text(row["text"], f" in {where}"), where)


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), "a number")


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
    prompts: list[PromptEntry] | None,
    recursive: bool,
    out_dir: Path,
    prompts_file: Path | None = None,
) -> tuple[list[Job], list[Path], list[tuple[str, str]]]:
    """Pair images with texts and give every output a distinct name.

    Without prompts every image gets ``text``. With prompts, each listed file gets its prompts (in
    file order), and images the prompts do not name get ``text`` if one was given; ``prompts_file``
    (where the prompts came from) is never an input. A prompt's file must lie inside PATH's folder
    (:class:`~.fileio.UnsafePathError` otherwise). Jobs come in sorted order. Returns (jobs,
    ignored non-image files, prompts naming missing files as (file, reason)).
    """
    root = path if path.is_dir() else path.parent
    images, ignored = list_inputs(path, recursive, out_dir, prompts_file)
    texts: dict[Path, list[str]] = {image: [] for image in images}
    missing = _assign_prompts(root, texts, prompts or [])
    for listed in texts.values():
        if not listed and text is not None:
            listed.append(text)
    jobs = [Job(image, "", image.relative_to(root).as_posix(), listed) for image, listed in sorted(texts.items()) if listed]
    name_outputs(jobs)
    return jobs, ignored, missing


def _assign_prompts(root: Path, texts: dict[Path, list[str]], prompts: list[PromptEntry]) -> list[tuple[str, str]]:
    """Append each prompt's text to its image in ``texts`` (adding images the listing lacks);
    return the prompts whose file does not exist. Two spellings of one file are one image."""
    by_identity: dict[object, Path] | None = None
    missing = []
    for prompt in prompts:
        target = confined(root, _name_inside(root, prompt), prompt.where)  # also refuses links leading out
        if target not in texts:
            if not target.is_file():
                missing.append((prompt.file, "file named in the prompts not found"))
                continue
            if by_identity is None:  # built once, only when a prompt names a file not listed as spelled
                by_identity = {_identity(image): image for image in reversed(list(texts))}
            target = by_identity.setdefault(_identity(target), target)
        texts.setdefault(target, []).append(prompt.text)
    return missing


def _name_inside(root: Path, prompt: PromptEntry) -> Path:
    """A prompt's file as a plain name relative to ``root``: a ``..`` that stays inside is folded
    away, an absolute path is accepted below ``root``; a name leading out is refused."""
    name = Path(os.path.normpath(prompt.file))
    if name.is_absolute():
        for base in (Path(os.path.abspath(root)), root.resolve()):
            if base == name or base in name.parents:
                return name.relative_to(base)
    elif name.parts[:1] != ("..",):
        return name
    raise UnsafePathError(
        f"{prompt.where}: {prompt.file!r} is outside {root}; name an image inside PATH's folder, relative to it"
    )


def _identity(file: Path) -> object:
    """What makes two spellings one file (case on a case-insensitive disk, hard links)."""
    try:
        stat = file.stat()
    except OSError:
        return file
    return stat.st_dev, stat.st_ino


def _fold(name: str) -> str:
    """``name`` as a case- and normalisation-insensitive file system compares it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def _text_stems(name: str, count: int) -> list[str]:
    """``NAME`` for one text, ``NAME.0``, ``NAME.1``, … for several."""
    return [name] if count == 1 else [f"{name}.{i}" for i in range(count)]


def name_outputs(jobs: list[Job]) -> None:
    """Set each job's output stem so that no two output files compare equal case-folded.

    ``cup.jpg`` + ``cup.png`` → ``cup_jpg``, ``cup_png`` (only the suffix tells them apart); a
    name still taken gets ``_2``, ``_3``, … in the jobs' (sorted) order, so names are deterministic.
    """
    stems = [PurePosixPath(job.label).with_suffix("").as_posix() for job in jobs]
    counts = Counter(_fold(stem) for stem in stems)
    files: set[str] = set()
    folders: set[str] = set()
    for job, stem in zip(jobs, stems):
        suffix = PurePosixPath(job.label).suffix.lstrip(".").lower()
        if counts[_fold(stem)] > 1 and suffix:
            stem = f"{stem}_{suffix}"
        job.name, counter = stem, 1
        while not _claim(_text_stems(job.name, len(job.texts)), files, folders):
            counter += 1
            job.name = f"{stem}_{counter}"


def _claim(stems: list[str], files: set[str], folders: set[str]) -> bool:
    """Reserve the output files of ``stems`` (attention maps included) and their folders, unless
    one of them is taken, as a file or as a folder."""
    wanted = {_fold(stem + suffix) for stem in stems for suffix in OUTPUT_SUFFIXES}
    parents = {_fold(str(parent)) for parent in PurePosixPath(stems[0]).parents if str(parent) != "."}
    if any(name in files or name in folders for name in wanted) or any(name in files for name in parents):
        return False
    files.update(wanted)
    folders.update(parents)
    return True


def output_names(job: Job) -> Iterator[tuple[str, str]]:
    """(text, output stem) per text: ``NAME`` for one text, ``NAME.0``, ``NAME.1``, … for several."""
    yield from zip(job.texts, _text_stems(job.name, len(job.texts)))


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_pixels: int = DEFAULT_BATCH_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    runtime: str | None = None,
    precision: str = "fp32",
) -> PredictSummary:
    """Segment ``text`` (or the prompts file's texts) in one image or every image of a folder.

    Writes, under ``out_dir`` only: ``NAME.mask.png`` (0/255, original size), ``NAME.overlay.jpg``
    (mask tinted over the image), with ``attention`` also ``NAME.attn_{encoder,fpn,decoder}.jpg``,
    and ``predictions.jsonl`` (rewritten each run: file, text, mask_area, mean_prob, height, width
    and the output paths). Images that cannot be read, or whose header declares more than
    ``max_pixels`` pixels (``None``: no limit), are skipped and listed in ``summary.skipped``; files
    without an image suffix are ignored (``summary.ignored``). A batch holds at most ``batch_size``
    (image, text) pairs and ``batch_pixels`` decoded pixels (or one image, if larger).
    ``progress(done, total)`` is called per image, ``warn(message)`` for truncated texts.
    ``checkpoint`` is a run's checkpoint or a bundle folder (``runtime`` torch, ``precision`` fp32
    or bf16) or an exported ``.onnx`` file (``runtime`` onnx); the files written are the same. Bad
    arguments and prompts raise :class:`SharedRISError` before the model loads.
    """
    path, out_dir = Path(path), Path(out_dir)
    _check_options(text, prompts, batch_size=batch_size, max_pixels=max_pixels, batch_pixels=batch_pixels)
    runtime = check_inference_options(checkpoint, runtime, precision, device, attention)
    check_output_folder(out_dir, "--out")
    prompts_file = Path(prompts) if prompts is not None else None
    entries = read_prompt_entries(prompts_file) if prompts_file is not None else None
    jobs, ignored, missing = plan_jobs(path, text, entries, recursive, out_dir, prompts_file)
    predictor = Predictor.from_checkpoint(checkpoint, tokenizer, device, runtime=runtime, precision=precision)
    _warn_truncated(predictor, jobs, warn)

    summary = PredictSummary(out_dir, skipped=list(missing), ignored=[str(f) for f in ignored])
    _make_folder(out_dir)
    with confined(out_dir, summary.jsonl.name, "an output name").open("w", encoding="utf-8") as jsonl:
        batch = _Batch(predictor, attention, summary, jsonl, batch_size, batch_pixels)
        for done, job in enumerate(jobs, 1):
            batch.add_job(job, max_pixels)
            if progress is not None:
                progress(done, len(jobs))
        batch.flush()
    return summary


def _check_options(text: str | None, prompts, **at_least_one: int | None) -> None:
    for option, value in at_least_one.items():
        if value is not None and value < 1:
            raise SharedRISError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if text is None and prompts is None:
        raise SharedRISError("give a TEXT such as 'the red cup' or a --prompts FILE")
    if text is not None:
        check_text(text)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SharedRISError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None


def _warn_truncated(predictor: Predictor, jobs: list[Job], warn: Callable[[str], None] | None) -> None:
    limit = predictor.tokenizer.max_len - 2
    for distinct in dict.fromkeys(t for job in jobs for t in job.texts):
        if predictor.tokenizer.is_truncated(distinct) and warn is not None:
            warn(f"text {distinct!r} is longer than {limit} tokens; only its first {limit} are used")


@dataclass
class _Batch:
    """(image, text) pairs waiting for one forward pass. Flushed when ``size`` pairs wait, and
    before decoding an image whose pairs would take the pixels held past ``pixel_budget`` (each
    pair counts its image's pixels: it keeps the image and gets a full-size mask)."""

    predictor: Predictor
    attention: bool
    summary: PredictSummary
    jsonl: io.TextIOBase
    size: int
    pixel_budget: int
    pending: list[_Pending] = field(default_factory=list)
    held_pixels: int = 0

    def add_job(self, job: Job, max_pixels: int | None) -> None:
        def make_room(width: int, height: int) -> None:  # before decoding: never two big images at once
            if self.pending and self.held_pixels + width * height * len(job.texts) > self.pixel_budget:
                self.flush()

        try:
            image = open_image(job.path, max_pixels, before_decode=make_room)
        except ImageReadError as exc:
            self.summary.skipped.append((str(job.path), exc.reason))
            return
        pixels = self.predictor.preprocess(image)
        for text, stem in output_names(job):
            self.pending.append(_Pending(job, image, pixels, text, stem))
            self.held_pixels += image.width * image.height
            if len(self.pending) >= self.size:
                self.flush()

    def flush(self) -> None:
        """Predict the pending pairs as one batch, write their files and empty the batch."""
        if self.pending:
            pixels = torch.stack([p.pixels for p in self.pending])
            sizes = [(p.image.height, p.image.width) for p in self.pending]
            predictions = self.predictor.predict_tensors(pixels, sizes, [p.text for p in self.pending], self.attention)
            for pair, prediction in zip(self.pending, predictions):
                _write_outputs(pair, prediction, self.summary, self.jsonl)
        self.pending.clear()
        self.held_pixels = 0


def _write_outputs(pair: _Pending, prediction: Prediction, summary: PredictSummary, jsonl: io.TextIOBase) -> None:
    """The mask, overlay and attention files of one pair, each through :func:`confined`, and its record."""
    suffixes = {"mask": ".mask.png", "overlay": ".overlay.jpg"}
    suffixes.update({f"attn_{key}": f".attn_{key}.jpg" for key in ATTENTION_KEYS if key in prediction.attention})
    files = {key: confined(summary.out_dir, pair.stem + suffix, "an output name") for key, suffix in suffixes.items()}
    _make_folder(files["mask"].parent)
    try:
        save_mask(prediction.mask, files["mask"])
        overlay_mask(pair.image, prediction.mask).save(files["overlay"], quality=90)
        for key in ATTENTION_KEYS:
            if f"attn_{key}" in files:
                overlay_attention(pair.image, prediction.attention[key]).save(files[f"attn_{key}"], quality=90)
    except OSError as exc:  # a full disk, a read-only folder
        raise SharedRISError(f"{exc.filename or summary.out_dir}: cannot write ({exc.strerror or exc})") from None
    record = {
        "file": pair.job.label,
        "text": pair.text,
        "mask_area": prediction.area,
        "mean_prob": round(prediction.mean_prob, 6),
        "no_target": prediction.no_target,
        "height": pair.image.height,
        "width": pair.image.width,
        **{key: path.relative_to(summary.out_dir).as_posix() for key, path in files.items()},
    }
    jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary.written.extend(files.values())
    summary.predictions += 1
    summary.no_target += prediction.no_target
