"""``sris demo``: a local web page (Gradio) to segment images by text with one trained model.

The model is loaded once; requests wait in Gradio's queue and run one at a time. Everything the
server writes (uploads, example images, mask PNGs, Gradio's cache) lives in one temporary folder,
removed when the server stops. An upload is checked before it is decoded: its bytes by Gradio's
``max_file_size`` and here again (the HTTP API also takes data URLs), its pixels from the header
by :func:`~shared_ris.predictor.open_image`. Errors a user can fix are one message on the page.

:class:`Segmenter` is the page's work without Gradio; Gradio (the ``[demo]`` extra) is imported
only by :func:`serve`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from PIL import Image

from .bundle import MAX_TEXT_BYTES, MODEL_CARD, RECIPE, read_recipe
from .checkpoint import read_trained
from .data.synthetic import DATASET as SYNTHETIC
from .data.synthetic import export_examples
from .errors import CheckpointError, SharedRISError, first_line
from .fileio import read_small_text
from .predict import ATTENTION_KEYS, check_text
from .predictor import ImageReadError, ImageTooLargeError, Prediction, Predictor, open_image
from .visualize import MASK_PALETTE, overlay_attention, overlay_masks, save_mask

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
# A page answers whoever reaches it: smaller bounds than sris predict's for local files (64 MP).
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD_MB = 20
MAX_EXPRESSIONS = len(MASK_PALETTE)  # each expression gets a colour of its own
KEEP_RESULTS_S = 3600  # mask PNGs offered for download are deleted an hour after they were made
COLUMNS = ["#", "colour", "expression", "pixels", "score", "ms"]  # score: mean probability inside the mask; pixels: "no target" when decided so
NEEDS_EXTRA = "sris demo needs the [demo] extra: pip install 'shared-ris[demo]'"
COLOR_NAMES = {rgb: name for name, rgb in MASK_PALETTE.items()}
# Small images (the synthetic scenes are 64 px) fill their box, as square pixels rather than blurred.
PAGE_CSS = """
#image img, #overlay img { width: 100%; height: 100%; object-fit: contain; }
#image img, #overlay img, #attention img { image-rendering: pixelated; }
"""


# -- what the page says about the model --------------------------------------------------------------


@dataclass
class ModelInfo:
    """The recipe, training set and training length of a checkpoint, for the page's header."""

    checkpoint: str  # the file or folder name
    recipe: str
    image_size: int
    threshold: float
    dataset: str | None  # the training set's name, when the checkpoint records it
    step: int | None

    def markdown(self) -> str:
        trained = f"trained on **{self.dataset}**" if self.dataset else "training set not recorded in the checkpoint"
        steps = f" for {self.step:,} steps" if self.step is not None else ""
        return (
            f"recipe **{self.recipe}** ({self.image_size} px input, τ = {self.threshold:g}), {trained}{steps} · "
            f"checkpoint `{self.checkpoint}`"
        )


def describe_checkpoint(checkpoint: str | Path) -> ModelInfo:
    """:class:`ModelInfo` of a run's checkpoint (which records its dataset since ``sris train``
    writes it) or of a bundle folder (whose model card names it when exported with ``--data``)."""
    path = Path(checkpoint)
    if path.is_dir():
        recipe, meta = read_recipe(path / RECIPE), {"dataset": card_dataset(path / MODEL_CARD)}
    else:
        trained = read_trained(path)
        recipe, meta = trained.recipe, trained.meta
    dataset, step = meta.get("dataset"), meta.get("step")
    return ModelInfo(
        path.name, recipe.name, recipe.model.image_size, recipe.model.threshold,
        dataset if isinstance(dataset, str) and dataset else None, step if isinstance(step, int) else None,
    )  # fmt: skip


def card_dataset(card: Path) -> str | None:
    """The first name under ``datasets`` in a model card's YAML front matter, if any."""
    if not card.is_file():
        return None
    text = read_small_text(card, MAX_TEXT_BYTES, "export the bundle again", CheckpointError)
    end = text.find("\n---", 4)
    if not text.startswith("---\n") or end < 0:
        return None
    try:
        front = yaml.safe_load(text[4:end])
    except yaml.YAMLError:
        return None
    names = front.get("datasets") if isinstance(front, dict) else None
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


# -- the page's work, without Gradio ----------------------------------------------------------------


@dataclass
class Result:
    """What one request shows: the overlay, the attention maps, the mask files and a table row each."""

    overlay: Image.Image
    attention: list[tuple[Image.Image, str]]  # (map over the image, caption), per expression and stage
    masks: list[Path]  # one PNG (0/255, the image's size) per expression
    rows: list[list[Any]] = field(default_factory=list)  # per expression, as COLUMNS


def expressions(text: str | None) -> list[str]:
    """The text box → its non-blank lines, one expression each."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        check_text("", " in the text box")  # raises the usual one line
    if len(lines) > MAX_EXPRESSIONS:
        raise SharedRISError(f"{len(lines)} expressions, at most {MAX_EXPRESSIONS} at a time (one colour each); remove some lines")
    return lines


class Segmenter:
    """Check an uploaded file and the text box, predict each expression, draw the overlay (a
    colour per expression) and attention maps, and write the mask PNGs under ``results``."""

    def __init__(self, predictor: Predictor, results: Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20) -> None:
        self.predictor, self.results = predictor, Path(results)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.attention = predictor.runtime == "torch"  # an ONNX graph runs no attention hooks

    def read_upload(self, path: str | Path | None) -> Image.Image:
        """The uploaded file as RGB; over the limits or unreadable is one line naming the fix."""
        if not path:
            raise SharedRISError("no image: upload one, take one with the webcam, or click an example")
        path = Path(path)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise SharedRISError(f"the file is {size / 2**20:.1f} MB, over the limit of {self.max_bytes / 2**20:g} MB; upload a smaller image")
        try:
            return open_image(path, self.max_pixels)
        except ImageTooLargeError as exc:
            raise SharedRISError(f"the image is too large: {exc.reason}; upload a smaller image") from None
        except ImageReadError as exc:  # the reason may quote the temporary path: show the file's name only
            reason = exc.reason.replace(str(path), path.name)
            raise SharedRISError(f"{path.name} is not an image we can read: {reason}; upload a JPEG, PNG or WebP image") from None

    def segment(self, upload: str | Path | None, text: str | None) -> Result:
        texts = expressions(text)
        image = self.read_upload(upload)
        pixels = self.predictor.preprocess(image)[None]  # (1, 3, S, S), once for every expression
        timed: list[tuple[Prediction, float]] = []
        for expression in texts:  # one at a time, so each has its own time
            started = time.perf_counter()
            prediction = self.predictor.predict_tensors(pixels, [(image.height, image.width)], [expression], self.attention)[0]
            timed.append((prediction, (time.perf_counter() - started) * 1000))
        overlay, colors = overlay_masks(image, [prediction.mask for prediction, _ in timed])
        folder = self._new_result_folder()
        result = Result(overlay, [], [])
        for number, (expression, (prediction, ms), color) in enumerate(zip(texts, timed, colors), 1):
            result.masks.append(folder / f"mask{number}_{_file_label(expression)}.png")
            save_mask(prediction.mask, result.masks[-1])
            pixels_shown = "no target" if prediction.no_target else prediction.area  # a generalized model's "nothing here"
            result.rows.append([number, COLOR_NAMES[color], expression, pixels_shown, round(prediction.mean_prob, 4), round(ms, 1)])
            for key in ATTENTION_KEYS:
                if key in prediction.attention:
                    result.attention.append((overlay_attention(image, prediction.attention[key]), f"{number}. {key}: {expression}"))
        return result

    def _new_result_folder(self) -> Path:
        """A fresh folder for one request's masks; folders older than KEEP_RESULTS_S go first."""
        self.results.mkdir(parents=True, exist_ok=True)
        for old in self.results.iterdir():
            if time.time() - old.stat().st_mtime > KEEP_RESULTS_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.results))


def _file_label(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of an expression ("the red circle" → "the_red_circle")."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "mask"


def example_inputs(folder: Path, info: ModelInfo) -> list[list[str]]:
    """[image path, expression] pairs: fresh synthetic scenes when the model learnt from the
    synthetic set (at its input size), none otherwise."""
    if info.dataset != SYNTHETIC:
        return []
    export_examples(folder, count=8, size=info.image_size)
    prompts = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    return [[str(folder / prompt["file"]), prompt["text"]] for prompt in prompts]


# -- the Gradio page ----------------------------------------------------------------------------------


def require_gradio() -> None:
    """Fail in one line, before anything loads, when the [demo] extra is missing."""
    if importlib.util.find_spec("gradio") is None:
        raise SharedRISError(NEEDS_EXTRA)


@contextlib.contextmanager
def server_environment(work: Path) -> Iterator[Any]:
    """Import Gradio with its upload cache, and torch's compile cache (which loading a model
    creates), inside ``work``; Gradio's telemetry and update check off (nothing phones home).
    The environment is restored afterwards."""
    settings = {
        "GRADIO_TEMP_DIR": str(work / "gradio"), "TORCHINDUCTOR_CACHE_DIR": str(work / "torch"),
        "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        import gradio
    except ImportError:
        raise SharedRISError(NEEDS_EXTRA) from None
    try:
        yield gradio
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def uploaded_image(gr, **options) -> Any:
    """A ``gr.Image`` that hands on the uploaded file's path as it came: Gradio's own preprocessing
    opens the file (and decodes it when the mode differs) before our limits could apply. Data URLs,
    which Gradio would decode, are refused. (Not a subclass: Gradio writes a ``.pyi`` stub beside
    the module of every component class.)"""
    image = gr.Image(type="filepath", image_mode=None, **options)

    def path_as_uploaded(payload):
        if payload is not None and payload.path is None:
            raise gr.Error("send the image as a file (gradio_client: handle_file(PATH)), not as a data URL", print_exception=False)
        return payload.path if payload is not None else None

    image.preprocess = path_as_uploaded  # Blocks calls the instance's preprocess
    return image


def build_page(gr, segmenter: Segmenter, info: ModelInfo, examples: list[list[str]]):
    """The Blocks page; its one event is also the HTTP API's ``/segment``."""

    def segment(upload: str | None, text: str | None):
        try:
            result = segmenter.segment(upload, text)
        except SharedRISError as exc:  # the message goes to the page; the server goes on
            raise gr.Error(str(exc), duration=None, print_exception=False) from None
        return result.overlay, result.attention, [str(path) for path in result.masks], result.rows

    with gr.Blocks(title="Shared-RIS demo", analytics_enabled=False) as page:
        gr.Markdown(f"## Shared-RIS: segment by text\n{info.markdown()}")
        with gr.Row():
            with gr.Column():
                image = uploaded_image(gr, label="image", sources=["upload", "webcam", "clipboard"], height=320, elem_id="image")
                text = gr.Textbox(label="what to segment: one expression per line, each gets its own colour", lines=3, elem_id="text")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                limits = f"Images up to {segmenter.max_pixels:,} pixels and {segmenter.max_bytes / 2**20:g} MB."
                gr.Markdown(limits)
                if examples:
                    gr.Examples(examples, [image, text], label="synthetic scenes the model has not seen", examples_per_page=4, cache_examples=False)
            with gr.Column():
                overlay = gr.Image(label="overlay: each mask outlined and tinted", type="pil", format="png", height=320, interactive=False, elem_id="overlay")
                table = gr.Dataframe(headers=COLUMNS, label="per expression", interactive=False, elem_id="table")
                masks = gr.File(label="masks (PNG, 0/255)", file_count="multiple", interactive=False, elem_id="masks")
        gallery = gr.Gallery(
            label="where the text's [CLS] looks: encoder, FPN, decoder (the paper's Fig. 7)", columns=6, height=300, object_fit="contain", elem_id="attention",
        )
        button.click(segment, [image, text], [overlay, gallery, masks, table], api_name="segment")
    return page


def serve(
    checkpoint: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    device: str = "cpu",
    tokenizer: str | Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the page for ``checkpoint`` (a run's ``best.pt``, a bundle folder or an ``.onnx``
    file) until Ctrl-C or SIGTERM. ``on_ready(url)`` is called once it answers. Returns after the
    server has stopped and its temporary folder is gone."""
    require_gradio()
    if max_pixels < 1 or max_upload_mb <= 0:
        raise SharedRISError("--max-pixels and --max-upload-mb must be positive")
    info = describe_checkpoint(checkpoint) if Path(checkpoint).suffix.lower() != ".onnx" else None
    with tempfile.TemporaryDirectory(prefix="sris-demo-") as work, server_environment(Path(work)) as gr:
        predictor = Predictor.from_checkpoint(checkpoint, tokenizer, device)
        info = info or ModelInfo(Path(checkpoint).name, "exported ONNX model", predictor.image_size, predictor.threshold, None, None)
        segmenter = Segmenter(predictor, Path(work) / "results", max_pixels, int(max_upload_mb * 2**20))
        page = build_page(gr, segmenter, info, example_inputs(Path(work) / "examples", info))
        page.queue(default_concurrency_limit=1, max_size=32)  # one forward pass at a time
        try:
            _, url, share_url = page.launch(
                server_name=host, server_port=port, share=share, max_file_size=segmenter.max_bytes, prevent_thread_lock=True,
                quiet=True, ssr_mode=False, mcp_server=False, allowed_paths=[work], css=PAGE_CSS,
            )  # fmt: skip
        except OSError as exc:  # the port is taken, the host is not this machine's
            raise SharedRISError(f"cannot serve on {host}:{port} ({first_line(exc)}); choose another --port or --host") from None
        try:
            if on_ready is not None:
                on_ready(share_url or url)
            wait_for_stop()
        finally:
            page.close()


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM; both end in a clean stop (the temporary folder is removed)."""
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main else None
    try:
        while not stop.wait(0.2):  # a timed wait: Ctrl-C's KeyboardInterrupt gets through
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
