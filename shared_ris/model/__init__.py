from ..errors import CheckpointError
from .beit3 import BEiT3
from .build import build_beit3, build_decoder, build_fpn, build_model
from .decoder import SharedMaskDecoder
from .fpn import NoFPN, SharedFPN
from .loss import dice_loss, segmentation_loss
from .no_target import NoTargetHead, NoTargetRule, run_model
from .postprocess import logits_to_mask, upsample_probabilities
from .pretrained import LoadReport, load_beit3_checkpoint, resample_vision_positions, state_dict_kind
from .shared_ris import SharedRIS

__all__ = [
    "BEiT3", "SharedFPN", "NoFPN", "SharedMaskDecoder", "SharedRIS",
    "build_beit3", "build_fpn", "build_decoder", "build_model",
    "CheckpointError", "LoadReport", "load_beit3_checkpoint", "resample_vision_positions", "state_dict_kind",
    "dice_loss", "segmentation_loss", "logits_to_mask", "upsample_probabilities",
    "NoTargetHead", "NoTargetRule", "run_model",
]
