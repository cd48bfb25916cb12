"""An exported ``.onnx`` file as a model: its metadata read defensively, its external weights kept
inside its folder, and its forward pass in ONNX Runtime. :mod:`.export` writes these files.

The file is self-sufficient: beside the graph (images, text ids, padding mask → logits, dynamic
batch axis) its ``metadata_props`` hold the recipe (YAML), the tokenizer (the sentencepiece model,
base64), the threshold τ and the image size, so a :class:`~.predictor.Predictor` needs nothing else.
Weights over :data:`EXTERNAL_DATA_BYTES` live in ``NAME.onnx.data`` beside it (ONNX's external data).

An ``.onnx`` file is data like any other: every field is checked before ONNX Runtime sees the
file, and a weight file it names must be a plain name inside the ``.onnx`` file's folder.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .config import Recipe, RecipeError, recipe_from_yaml
from .errors import SharedRISError, first_line
from .fileio import confined
from .tokenizer import Tokenizer

ONNX_EXTRA = "pip install 'shared-ris[onnx]'"
FORMAT_VERSION = 1
INPUT_NAMES = ("images", "text_ids", "text_padding_mask")
OUTPUT_NAME = "logits"
# Above this many bytes of weights an export keeps them in NAME.onnx.data (protobuf stops at 2 GB;
# a separate file also lets ONNX Runtime read them without parsing them as a message).
EXTERNAL_DATA_BYTES = 100 * 2**20
# metadata_props keys; every value is a string.
META = {
    "format": "shared_ris.format",
    "version": "shared_ris.version",
    "recipe": "shared_ris.recipe",
    "tokenizer": "shared_ris.tokenizer",
    "threshold": "shared_ris.threshold",
    "image_size": "shared_ris.image_size",
    "max_text_len": "shared_ris.max_text_len",
    "quantize": "shared_ris.quantize",
    "source": "shared_ris.source",
}
QUANTIZATIONS = ("none", "int8")
# ONNX TensorProto element types of the three inputs and the output.
FLOAT, INT64, BOOL = 1, 7, 9


class OnnxModelError(SharedRISError):
    """An ``.onnx`` file that cannot be used; one line naming it and the fix."""


def require(module: str):
    """Import an optional dependency of the ``[onnx]`` extra, or fail with one line naming it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SharedRISError(f"ONNX support needs the [onnx] extra ({module} is not installed): {ONNX_EXTRA}") from None


@dataclass
class OnnxMetadata:
    """What an exported file records beside its graph."""

    recipe: Recipe
    tokenizer: bytes  # the sentencepiece model file, byte for byte
    threshold: float
    quantize: str
    source: str = ""
    version: str = ""

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` of an export."""
        return {
            META["format"]: str(FORMAT_VERSION),
            META["version"]: __version__,
            META["recipe"]: self.recipe.to_yaml(),
            META["tokenizer"]: base64.b64encode(self.tokenizer).decode("ascii"),
            META["threshold"]: repr(float(self.threshold)),
            META["image_size"]: str(self.recipe.model.image_size),
            META["max_text_len"]: str(self.recipe.model.max_text_len),
            META["quantize"]: self.quantize,
            META["source"]: self.source,
        }


def read_metadata(path: str | Path) -> OnnxMetadata:
    """Parse and check an exported file's graph header and metadata, without loading its weights.

    Raises :class:`OnnxModelError` (one line) for anything but a shared-ris export whose weight
    files lie inside its folder."""
    path = Path(path)
    proto = _load_proto(path)
    check_external_data(proto, path)
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = _parse_props(props, path)
    _check_signature(proto.graph, metadata.recipe, path)
    return metadata


def _load_proto(path: Path):
    onnx = require("onnx")
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file; pass a model written by sris export --format onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, truncated file, not protobuf at all
        raise OnnxModelError(f"{path}: not an ONNX model ({first_line(exc)}); pass a file written by sris export --format onnx") from None


def graph_tensors(graph) -> Iterator:
    """Every tensor a graph holds: initializers, sparse ones, node attributes, sub-graphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _attribute_tensors(graph.node)


def _attribute_tensors(nodes) -> Iterator:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from graph_tensors(graph)


def check_external_data(proto, path: Path) -> list[Path]:
    """The weight files ``proto`` reads, each a plain name inside ``path``'s folder that exists;
    :class:`UnsafePathError` / :class:`OnnxModelError` otherwise, before any of them is opened."""
    folder, files = path.parent, {}
    tensors = list(graph_tensors(proto.graph))
    for function in proto.functions:
        tensors += list(_attribute_tensors(function.node))
    for tensor in tensors:
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = confined(folder, location, f"{path}: weights of {tensor.name!r}")
        if not target.is_file():
            raise OnnxModelError(f"{path}: its weight file {location!r} is missing; keep it beside the .onnx file (sris export writes both)")
        files[target] = None
    return list(files)


def _parse_props(props: dict[str, str], path: Path) -> OnnxMetadata:
    if META["format"] not in props:
        raise OnnxModelError(f"{path}: an ONNX model without shared-ris metadata; export it with sris export --format onnx")
    if props[META["format"]] != str(FORMAT_VERSION):
        raise OnnxModelError(f"{path}: written in shared-ris ONNX format {props[META['format']][:20]!r}, this version reads {FORMAT_VERSION}; upgrade shared-ris or export again")
    missing = [key for key in ("recipe", "tokenizer", "threshold", "image_size", "max_text_len", "quantize") if META[key] not in props]
    if missing:
        raise OnnxModelError(f"{path}: its metadata lacks {META[missing[0]]}; export it again with sris export --format onnx")
    recipe = _parse_recipe(props[META["recipe"]], path)
    threshold = _parse_number(props[META["threshold"]], float, path, "threshold")
    if not 0.0 < threshold < 1.0:
        raise OnnxModelError(f"{path}: its threshold {threshold} is not a probability in (0, 1); export it again")
    for key, expected in (("image_size", recipe.model.image_size), ("max_text_len", recipe.model.max_text_len)):
        if _parse_number(props[META[key]], int, path, key) != expected:
            raise OnnxModelError(f"{path}: its {key} ({props[META[key]][:20]}) disagrees with its recipe ({expected}); export it again")
    if props[META["quantize"]] not in QUANTIZATIONS:
        raise OnnxModelError(f"{path}: unknown quantization {props[META['quantize']][:20]!r} (expected one of {', '.join(QUANTIZATIONS)})")
    try:
        tokenizer = base64.b64decode(props[META["tokenizer"]], validate=True)
    except (binascii.Error, ValueError):
        raise OnnxModelError(f"{path}: its tokenizer metadata is not base64; export it again") from None
    return OnnxMetadata(recipe, tokenizer, threshold, props[META["quantize"]], props.get(META["source"], ""), props.get(META["version"], ""))


def _parse_recipe(text: str, path: Path) -> Recipe:
    try:
        return recipe_from_yaml(text, f"{path}: its recipe metadata")
    except RecipeError as exc:
        raise OnnxModelError(f"{exc}; export it again") from None


def _parse_number(text: str, kind: type, path: Path, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise OnnxModelError(f"{path}: its {what} metadata {text[:20]!r} is not a number; export it again") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise OnnxModelError(f"{path}: its {what} metadata is {value}; export it again")
    return value


def _check_signature(graph, recipe: Recipe, path: Path) -> None:
    """Inputs and output as an export writes them, at the recipe's sizes (the batch axis free)."""
    side, length = recipe.model.image_size, recipe.model.max_text_len
    expected = {"images": (FLOAT, [None, 3, side, side]), "text_ids": (INT64, [None, length]), "text_padding_mask": (BOOL, [None, length])}
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name: value for value in graph.output}
    if list(inputs) != list(INPUT_NAMES) or list(outputs) != [OUTPUT_NAME]:
        raise OnnxModelError(f"{path}: expected inputs {', '.join(INPUT_NAMES)} and output {OUTPUT_NAME}, got {', '.join(inputs)} → {', '.join(outputs)}")
    expected[OUTPUT_NAME] = (FLOAT, [None, 1, side // 4, side // 4])
    for name, value in {**inputs, **outputs}.items():
        kind, shape = expected[name]
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.elem_type != kind or len(dims) != len(shape) or any(e is not None and d != e for d, e in zip(dims, shape)):
            raise OnnxModelError(f"{path}: {name} has type {tensor_type.elem_type} and shape {dims}, not what its recipe needs ({kind}, {shape})")



def tokenizer_from_bytes(data: bytes, recipe: Recipe, where: Path) -> Tokenizer:
    """The embedded sentencepiece model as a :class:`Tokenizer` at the recipe's text length."""
    from .checkpoint import load_tokenizer  # checkpoint imports the model; keep this module light

    with tempfile.TemporaryDirectory(prefix="sris-tokenizer-") as folder:
        file = Path(folder) / "tokenizer.model"
        file.write_bytes(data)
        try:
            tokenizer = load_tokenizer(file, recipe)  # sentencepiece reads the whole file: the copy can go
        except SharedRISError as exc:
            reason = str(exc).replace(str(file), "embedded tokenizer")
            raise OnnxModelError(f"{where}: its embedded tokenizer cannot be used ({reason}); export it again") from None
    tokenizer.path = where  # messages name the .onnx file, not the vanished copy
    return tokenizer


class OnnxModel:
    """A :class:`~.model.SharedRIS` exported to ONNX, run by ONNX Runtime on the CPU.

    It answers the calls a :class:`~.predictor.Predictor` makes of a model (``image_size``,
    ``threshold``, ``model(images, text_ids, text_padding_mask) → logits``); attention maps are
    not in the graph (they come from torch forward hooks), so ``recording_attention`` is refused.
    """

    def __init__(self, path: Path, metadata: OnnxMetadata, session) -> None:
        self.path, self.metadata, self.session = path, metadata, session

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "OnnxModel":
        """Check ``path`` (:func:`read_metadata`) and open it in ONNX Runtime with ``threads``
        intra-op threads (default: torch's, so ``OMP_NUM_THREADS`` governs both runtimes)."""
        path = Path(path)
        metadata = read_metadata(path)
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's Fail / InvalidGraph / InvalidProtobuf ...
            raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)}); export it again") from None
        return cls(path, metadata, session)

    @property
    def recipe(self) -> Recipe:
        return self.metadata.recipe

    @property
    def image_size(self) -> int:
        return self.recipe.model.image_size

    @property
    def threshold(self) -> float:
        return self.metadata.threshold

    no_target_head = None  # not exported (sris export refuses a model with one)

    @property
    def no_target_min_area(self) -> int:
        return self.recipe.model.no_target_min_area

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_bytes(self.metadata.tokenizer, self.recipe, self.path)

    def __call__(self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor) -> torch.Tensor:
        """The exported forward: (B, 3, S, S), (B, T), (B, T) → logits (B, 1, S/4, S/4), on the CPU."""
        feeds = {
            "images": images.detach().cpu().float().contiguous().numpy(),
            "text_ids": text_ids.detach().cpu().long().numpy(),
            "text_padding_mask": text_padding_mask.detach().cpu().bool().numpy(),
        }
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])

    def recording_attention(self, run):
        raise SharedRISError(f"{self.path}: attention maps come from torch forward hooks, not the ONNX graph; use --runtime torch with the run's checkpoint for --attention")

