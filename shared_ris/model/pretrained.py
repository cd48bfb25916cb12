"""Official BEiT-3 weight files: one place that unwraps, renames and resizes (timm's
``checkpoint_filter_fn``). A training run's own files are :mod:`shared_ris.checkpoint`.

Official files are ``{"model": state_dict}`` (DeepSpeed: ``"module"``) with keys under ``beit3.``;
pretrained files also carry MLM / image heads that we ignore. The vision position table is
resampled to the model's grid the way the official fine-tuning code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..fileio import load_torch_file
from .beit3 import POSITION_OFFSET

VISION_POSITIONS = "encoder.embed_positions.A.weight"
# Keys an official file may lack without harm (absent in VQA / ImageNet fine-tuned files).
OPTIONAL_PREFIXES = ("encoder.layer_norm.",)
BEIT3_KEY_PREFIXES = ("beit3.", "encoder.layers.", "text_embed.", "vision_embed.")
SHARED_RIS_KEY_PREFIXES = ("fpn.", "decoder.")


def state_dict_kind(state_dict: dict) -> str:
    """``"shared-ris"`` (has FPN / decoder keys: a training run's weights), ``"beit3"`` (encoder keys
    only: official weights) or ``"unknown"``. The one place that tells the two files apart."""
    keys = [str(k).removeprefix("module.") for k in state_dict]
    if any(k.startswith(SHARED_RIS_KEY_PREFIXES) for k in keys):
        return "shared-ris"
    if any(k.startswith(BEIT3_KEY_PREFIXES) for k in keys):
        return "beit3"
    return "unknown"


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # optional keys our encoder defines but the file lacks
    ignored: list[str] = field(default_factory=list)  # keys in the file we do not define
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path}"]
        for key, (old, new) in self.resized.items():
            lines.append(f"  resized {key}: {list(old)} -> {list(new)}")
        lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing) or '-'}")
        ignored = ", ".join(self.ignored[:8]) + (" ..." if len(self.ignored) > 8 else "")
        lines.append(f"  ignored ({len(self.ignored)}): {ignored or '-'}")
        return "\n".join(lines)


def resample_vision_positions(table: torch.Tensor, num_patches: int, prefix_rows: int = POSITION_OFFSET + 1) -> torch.Tensor:
    """Resize a BEiT-3 vision position table to ``num_patches`` patch rows.

    Rows [:prefix_rows] (two fairseq padding rows and the cls row) are kept; the patch rows are
    reshaped to their square grid and resized bicubically (fp32, align_corners=False).
    table: (prefix_rows + g_old², D) → (prefix_rows + num_patches, D).
    """
    prefix, patches = table[:prefix_rows], table[prefix_rows:]
    old, new = math.isqrt(patches.shape[0]), math.isqrt(num_patches)
    if old * old != patches.shape[0] or new * new != num_patches:
        raise ValueError(f"position tables must hold square grids, got {patches.shape[0]} -> {num_patches} patches")
    if old == new:
        return table
    dim = table.shape[1]
    grid = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(new * new, dim).to(table.dtype)
    return torch.cat([prefix, patches], dim=0)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` safely (weights_only) and unwrap ``model`` / ``module``; bare dicts pass through."""
    obj = load_torch_file(path, "download beit3_base_patch16_224.pth from the BEiT-3 README")
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (expected {{'model': {{'beit3.…': tensor}}}})")
    return obj


def beit3_checkpoint_filter(state_dict: dict[str, torch.Tensor], encoder: nn.Module) -> tuple[dict, LoadReport]:
    """Map an official state dict onto ``encoder``: strip ``beit3.``, resize the vision positions,
    split ignored keys off. Raises :class:`CheckpointError` on anything that cannot load."""
    report = LoadReport(path="")
    ours = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("beit3.") :] if key.startswith("beit3.") else key
        if name in ours:
            mapped[name] = value
        else:
            report.ignored.append(key)
    if not mapped:
        if state_dict_kind(state_dict) == "shared-ris":
            raise CheckpointError("this is a Shared-RIS training checkpoint, not a BEiT-3 one; pass it as --checkpoint / --resume")
        raise CheckpointError(
            f"not a BEiT-3 checkpoint: none of its {len(state_dict)} keys (e.g. {next(iter(state_dict), '-')}) "
            "match the encoder; expected keys such as beit3.encoder.layers.0.self_attn.q_proj.A.weight"
        )
    missing = [k for k in ours if k not in mapped]
    required = [k for k in missing if not k.startswith(OPTIONAL_PREFIXES)]
    if required:
        raise CheckpointError(
            f"not a complete BEiT-3 checkpoint for this model: {len(required)} required keys are missing "
            f"(e.g. {required[0]}); check the file and the recipe's model size (base/large)"
        )
    report.missing = missing
    if VISION_POSITIONS in mapped and mapped[VISION_POSITIONS].shape != ours[VISION_POSITIONS].shape:
        old = mapped[VISION_POSITIONS]
        num_patches = ours[VISION_POSITIONS].shape[0] - POSITION_OFFSET - 1
        mapped[VISION_POSITIONS] = resample_vision_positions(old, num_patches)
        report.resized[VISION_POSITIONS] = (tuple(old.shape), tuple(mapped[VISION_POSITIONS].shape))
    for key, value in mapped.items():
        if value.shape != ours[key].shape:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {list(value.shape)} vs model {list(ours[key].shape)}; "
                "the recipe's encoder size does not match this checkpoint (base vs large?)"
            )
    report.loaded = len(mapped)
    return mapped, report


def load_beit3_checkpoint(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load an official BEiT-3 checkpoint into ``encoder`` (a :class:`BEiT3`) and report what happened."""
    try:
        mapped, report = beit3_checkpoint_filter(read_state_dict(path), encoder)
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    encoder.load_state_dict(mapped, strict=False)
    report.path = str(path)
    return report
