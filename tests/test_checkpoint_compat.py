"""Checkpoints written by an earlier main still load and resume, bit for bit.

``tests/data/main-8645589/`` was written by commit 8645589 (before the restructuring):
``last.pt`` by ``train_loop`` on ``test_train.MemoryData`` (the SMALL recipe, batch 4, 3 steps),
``spm.model`` by ``train_tokenizer``, ``expected_logits.pt`` by that commit's ``load_run`` + forward,
and ``expected_resume.json`` by that commit's ``train_loop(..., resume="auto")`` up to step 6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shared_ris.checkpoint import load_run
from shared_ris.config import recipe_from_dict
from shared_ris.train import train_loop
from test_train import MemoryData, losses, small_recipe

OLD_RUN = Path(__file__).parent / "data" / "main-8645589"


def test_old_checkpoint_loads_for_inference_with_the_same_logits():
    model, recipe, tokenizer = load_run(OLD_RUN / "last.pt", OLD_RUN / "spm.model")
    expected = torch.load(OLD_RUN / "expected_logits.pt", weights_only=True)
    ids, padding = tokenizer(["the small red circle", "a blue square on the left"])
    assert torch.equal(ids, expected["text_ids"]) and torch.equal(padding, expected["text_padding_mask"])
    with torch.no_grad():
        logits = model(expected["images"], ids, padding)
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
    assert recipe.model.encoder.embed_dim == 32


def test_old_checkpoint_resumes_to_the_same_losses(tmp_path):
    shutil.copy(OLD_RUN / "last.pt", tmp_path / "last.pt")
    reference = json.loads((OLD_RUN / "expected_resume.json").read_text())
    saved = torch.load(OLD_RUN / "last.pt", weights_only=True)["recipe"]  # the recipe it was trained with
    saved["train"]["max_steps"] = 6
    recipe = recipe_from_dict(saved)
    assert recipe.to_dict() == small_recipe(*reference["overrides"], "model.decoder.projection=false").to_dict() | {"name": recipe.name}
    summary = train_loop(recipe, MemoryData(recipe), tmp_path, resume="auto")
    assert summary["step"] == 6
    assert losses(tmp_path) == [tuple(pair) for pair in reference["losses"]]
