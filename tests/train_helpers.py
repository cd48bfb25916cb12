"""What the training tests share: a Shared-RIS small enough for milliseconds a step, and a progress
callback that asks the running process to stop, as a scheduler's SIGTERM would."""

from __future__ import annotations

import os
import signal

# Encoder, FPN and decoder of two layers at width 32 (add model.image_size and model.max_text_len).
SMALL_MODEL = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2", "model.encoder.ffn_dim=64",
    "model.encoder.max_text_positions=16", "model.fpn.stages=[1,2]", "model.fpn.dim=32", "model.fpn.num_heads=2",
    "model.decoder.num_heads=2",
]  # fmt: skip


def sigterm_after_step(step: int):
    """``progress`` for ``train`` / ``train_loop``: SIGTERM to this process once ``step`` is logged."""

    def progress(event: dict) -> None:
        if event["event"] == "step" and event["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return progress
