"""The user's door to a trained model: a :class:`Predictor` (load once, ask many), as
segment-anything's ``SamPredictor``. Folders, prompt files and output files are :mod:`.predict`.

The predictor owns the image↔model resizing, as segment-anything's does: an image is resized once
to S×S as the model was trained (the recipe's ``data.resize``: stretched, or letterboxed with its
aspect kept; bicubic, mean = std = 0.5, as BEiT-3 fine-tuning does), and the mask logits of the
image's part of the input are resized bilinearly back to the image's own size and thresholded at
the recipe's τ.

Two runtimes give the logits, with everything around them shared (same masks, same files):
``torch`` (a run's ``best.pt`` or a bundle folder; precision ``fp32`` or ``bf16`` autocast where the
device computes in bf16) and ``onnx`` (a file from ``sris export --format onnx``, fp32 or int8,
through ONNX Runtime on the CPU; no attention maps: those come from torch forward hooks).
"""

from __future__ import annotations

import contextlib
import math
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_run, load_tokenizer
from .data.transforms import RESIZES, content_box, image_to_tensor, load_image
from .device import check_device
from .errors import SharedRISError, first_line
from .model import NoTargetRule, SharedRIS, run_model, upsample_probabilities
from .model.postprocess import Box
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # the [onnx] extra is imported only when an .onnx file is loaded
    from .onnx_model import OnnxModel


# Decoded pixels allowed per image, read from the header before decoding: 8192 × 8192, which
# admits 64 MP phone photos (9248 × 6936) but not a small file that decodes to gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageReadError(SharedRISError):
    """An image file that cannot be decoded; ``reason`` says why, without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than the limit; it is never decoded."""


def open_image(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, before_decode: Callable[[int, int], None] | None = None
) -> Image.Image:
    """Read an image file as 8-bit RGB, rotated as its EXIF orientation says.

    Grayscale, RGBA / LA / transparent palette (composited on white), palette, 16-bit (scaled to
    8 bits, not clipped) and CMYK inputs all come out as RGB. An unreadable file, or one whose
    header declares more than ``max_pixels`` pixels (``None``: no limit but Pillow's own, about
    179 MP), raises :class:`ImageReadError`, whose message is one line naming the file.
    ``before_decode(width, height)`` is called between reading the header and decoding (a caller
    can free memory for the pixels to come).
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit that counts is ours
        with _read_errors(path):
            raw = Image.open(path)
        with raw:
            check_pixels(path, raw.size, max_pixels)  # from the header: nothing is decoded yet
            if before_decode is not None:
                before_decode(*raw.size)  # outside _read_errors: its failures are not this file's
            with _read_errors(path):
                return load_image(raw)


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn whatever decoding a bad file raises into one :class:`ImageReadError` line."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except Image.DecompressionBombError as exc:  # over Pillow's own limit (about 179 MP), refused from the header
        raise ImageTooLargeError(path, f"over Pillow's limit for one image ({first_line(exc)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot read image ({first_line(exc)})") from None


def check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse (``ImageTooLargeError``) a header ``size`` = (W, H) over ``max_pixels``."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        reason = f"{width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (--max-pixels)"
        raise ImageTooLargeError(path, reason)


@dataclass
class Prediction:
    """One (image, expression) result.

    Attributes:
        mask: (H, W) bool at the image's own size.
        mean_prob: mean σ over the mask's pixels (0.0 when the mask is empty).
        low_res_probs: (S/4, S/4) float32 probabilities at the model's output size.
        attention: {"encoder", "fpn", "decoder"} → (g, g) text-cls attention over the patches, when asked.
        no_target: the model decided the expression names nothing in the image (its no-target head,
            or the recipe's area rule); ``mask`` is then empty.
    """

    mask: np.ndarray
    mean_prob: float
    low_res_probs: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    no_target: bool = False

    @property
    def area(self) -> int:
        return int(self.mask.sum())


RUNTIMES = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 AVX512-BF16 or AMX, Arm's BF16 extension); without
    it oneDNN emulates bf16 and autocast is slower than fp32."""
    x86 = any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if x86 or platform.machine().lower() not in ("aarch64", "arm64"):
        return x86
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_runtime(checkpoint: str | Path, runtime: str | None) -> str:
    """The runtime for ``checkpoint``: ``onnx`` for an ``.onnx`` file, else ``torch``; a runtime
    that cannot run that file is one line."""
    is_onnx = Path(checkpoint).suffix.lower() == ".onnx"
    if runtime is None:
        return "onnx" if is_onnx else "torch"
    if runtime not in RUNTIMES:
        raise SharedRISError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" and is_onnx:
        raise SharedRISError(f"{checkpoint}: an ONNX model runs with --runtime onnx; --runtime torch needs a run's best.pt or a bundle folder")
    if runtime == "onnx" and not is_onnx:
        raise SharedRISError(
            f"--runtime onnx runs an exported model, not {checkpoint}: sris export --checkpoint {checkpoint} --format onnx --out model.onnx, "
            "then --checkpoint model.onnx"
        )
    return runtime


def check_precision(precision: str, device: str | torch.device, runtime: str = "torch") -> None:
    """One line when ``precision`` cannot run here: an unknown name, bf16 for an ONNX model (its
    precision is fixed at export), or bf16 on a device without bf16 arithmetic."""
    if precision not in PRECISIONS:
        raise SharedRISError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if runtime == "onnx":
        raise SharedRISError("--precision bf16 is a torch runtime setting; an ONNX model runs as exported (fp32, or int8 with sris export --quantize int8)")
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise SharedRISError("--precision bf16: this GPU has no bf16 arithmetic (before Ampere); use --precision fp32")
    elif not cpu_computes_bf16():
        raise SharedRISError(
            "--precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would be emulated and slower than fp32; "
            "use --precision fp32, or an int8 ONNX model (sris export --quantize int8)"
        )


def check_inference_options(checkpoint: str | Path, runtime: str | None, precision: str, device: str, attention: bool = False) -> str:
    """Every runtime / precision / device / attention check, before anything loads; returns the runtime."""
    check_device(device)
    runtime = resolve_runtime(checkpoint, runtime)
    if runtime == "onnx" and torch.device(device).type != "cpu":
        raise SharedRISError(f"--device {device}: ONNX models run on the CPU here; use --runtime torch with the run's checkpoint on a GPU")
    if runtime == "onnx" and attention:
        raise SharedRISError("--attention needs --runtime torch: the maps come from torch forward hooks, which an ONNX graph does not run")
    check_precision(precision, device, runtime)
    return runtime


def crop_to_box(grid: np.ndarray, box: Box | None, input_size: int) -> np.ndarray:
    """The cells of a (g, g) map over the S×S input that cover ``box`` (all of them when ``None``)."""
    if box is None:
        return grid
    top, left, height, width = box
    cells = grid.shape[0] / input_size
    rows = slice(int(top * cells), math.ceil((top + height) * cells))
    cols = slice(int(left * cells), math.ceil((left + width) * cells))
    return grid[rows, cols]


class Predictor:
    """Segment what a text refers to in images.

    Args:
        model: a trained :class:`SharedRIS` (put in eval mode here), or an
            :class:`~shared_ris.onnx_model.OnnxModel` (ONNX Runtime, CPU).
        tokenizer: the tokenizer the model was trained with.
        device: where the model runs; the model is moved there.
        threshold: τ on σ(logits); ``None`` uses ``model.threshold`` (the recipe's).
        precision: ``fp32``, or ``bf16`` (torch autocast; only where the device computes in bf16).
        resize: how images become S×S inputs, as the model was trained (the recipe's ``data.resize``):
            ``stretch``, or ``letterbox`` (aspect kept, centred on gray; masks and maps are mapped
            back from the image's box only).
    """

    def __init__(
        self, model: SharedRIS | OnnxModel, tokenizer: Tokenizer, device: str | torch.device = "cpu", threshold: float | None = None, precision: str = "fp32",
        resize: str = "stretch",
    ) -> None:
        self.device = torch.device(device)
        self.runtime = "torch" if isinstance(model, torch.nn.Module) else "onnx"
        check_precision(precision, self.device, self.runtime)
        self.model = model.to(self.device).eval() if self.runtime == "torch" else model
        self.tokenizer = tokenizer
        self.threshold = model.threshold if threshold is None else threshold
        self.no_target = NoTargetRule.of(model)
        self.precision = precision
        if resize not in RESIZES:
            raise SharedRISError(f"resize {resize!r}: choose one of {', '.join(RESIZES)}")
        self.resize = resize

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, tokenizer: str | Path | None = None, device: str = "cpu", runtime: str | None = None, precision: str = "fp32"
    ) -> "Predictor":
        """Load a trained model: a run's ``best.pt`` / ``last.pt`` or a bundle folder (torch), or an
        exported ``.onnx`` file (ONNX Runtime). ``runtime`` defaults to the one the file needs.
        The tokenizer is found beside a checkpoint (see :func:`shared_ris.checkpoint.load_run`) and
        read from an ``.onnx`` file's metadata; ``tokenizer`` overrides both."""
        runtime = check_inference_options(checkpoint, runtime, precision, device)
        if runtime == "onnx":
            from .onnx_model import OnnxModel  # the [onnx] extra, imported only when used

            model = OnnxModel.load(checkpoint)
            recipe = model.recipe
            text_tokenizer = load_tokenizer(tokenizer, recipe) if tokenizer is not None else model.tokenizer()
        else:
            model, recipe, text_tokenizer = load_run(checkpoint, tokenizer, device=device)
        return cls(model, text_tokenizer, device, precision=precision, resize=recipe.data.resize)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", precision: str = "fp32") -> "Predictor":
        """A bundle folder written by ``sris export --format bundle`` (Hugging Face layout:
        ``model.safetensors``, ``recipe.yaml``, ``tokenizer.model``); never unpickles."""
        return cls.from_checkpoint(folder, device=device, precision=precision)

    def _precision_context(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, S, S) float32 input: one bicubic resize (stretched or letterboxed), mean = std = 0.5."""
        return image_to_tensor(image, self.image_size, self.resize)

    def content_box(self, size: tuple[int, int]) -> Box | None:
        """Where an image of ``size`` = (H, W) lies in the S×S input; ``None`` when it fills it."""
        return content_box(*size, self.image_size, self.resize)

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → ids (B, T), padding mask (B, T) True = pad; too-long texts are truncated."""
        return self.tokenizer(list(texts))

    def postprocess(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(1, h, w) logits → (mask bool (H, W), mean σ inside the mask) at ``size`` = (H, W).

        One float map at full size is alive at a time: resize, sigmoid and masking run in place.
        """
        probs = upsample_probabilities(logits, size, self.content_box(size), self.image_size)
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
        inputs = (pixels.to(self.device), ids.to(self.device), padding.to(self.device))
        with self._precision_context():
            run = lambda: run_model(self.model, self.no_target, *inputs)  # noqa: E731
            (logits, no_target_logits), maps = self.model.recording_attention(run) if attention else (run(), {})
        logits = logits.float().cpu()
        decided = self.no_target.decide(logits, no_target_logits, self.image_size, self.threshold)
        maps = {k: v.float().cpu().numpy() for k, v in maps.items()}
        results = []
        for i, size in enumerate(sizes):
            mask, mean_prob = self.postprocess(logits[i], size)
            if decided[i]:  # "names nothing": the mask is emptied, as evaluation scores it
                mask, mean_prob = np.zeros_like(mask), 0.0
            crop = lambda grid: crop_to_box(grid, self.content_box(size), self.image_size)  # noqa: E731
            attention_maps = {k: crop(v[i]) for k, v in maps.items()}
            results.append(Prediction(mask, mean_prob, crop(logits[i, 0].sigmoid().numpy()), attention_maps, bool(decided[i])))
        return results

    def predict(self, images: Sequence[Image.Image], texts: Sequence[str] | str, attention: bool = False) -> list[Prediction]:
        """RGB images and one text each (or one text for all) → one :class:`Prediction` per image."""
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.predict_tensors(pixels, [(image.height, image.width) for image in images], texts, attention)
