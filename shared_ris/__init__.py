"""Shared-RIS: referring image segmentation with a single BEiT-3 encoder."""

__version__ = "0.1.0"

from .errors import SharedRISError
from .config import Recipe, RecipeError, available_recipes, load_recipe
from .model import CheckpointError, SharedRIS, build_model
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "__version__", "SharedRISError", "Recipe", "RecipeError", "available_recipes", "load_recipe",
    "SharedRIS", "build_model", "CheckpointError", "Tokenizer", "TokenizerError",
]
