"""Data: refer files or synthetic scenes → WebDataset shards + manifest → streaming loaders.

    prepare_refer / prepare_parquet / prepare_synthetic    write {dataset}-{split}-NNNNNN.tar + manifest.json
    export_examples                                        loose synthetic images + prompts.jsonl for predict
    read_manifest                                          what a prepared folder holds
    build_train_loader / build_eval_loader                 batches for training and evaluation
"""

from .errors import DataError
from .location import DataLocation, data_location
from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader, train_steps_per_epoch
from .manifest import read_manifest
from .prepare import prepare_parquet, prepare_refer
from .refer import annotation_mask
from .safe_pickle import UnsafePickleError, load_pickle
from .synthetic import export_examples, prepare_synthetic
from .transforms import image_to_tensor, load_image, load_mask, mask_to_tensor

__all__ = [
    "DataError", "UnsafePickleError", "DataLocation", "data_location",
    "prepare_refer", "prepare_parquet", "prepare_synthetic", "export_examples", "read_manifest",
    "build_train_loader", "build_eval_loader", "train_steps_per_epoch", "TrainLoader", "EvalLoader",
    "annotation_mask", "load_pickle", "image_to_tensor", "load_image", "load_mask", "mask_to_tensor",
]
