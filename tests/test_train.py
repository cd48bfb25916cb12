"""Training loop without the shard loader: LR schedule, parameter groups, checkpoints,
DDP ≡ one big batch (2 gloo processes), SIGTERM stop + exact resume, NaN stop."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp

from shared_ris import build_model, load_recipe
from shared_ris.config import TrainConfig, recipe_from_dict
from shared_ris.distributed import DistEnv, free_port, setup, teardown
from shared_ris.optim import build_optimizer, lr_at, param_groups
from shared_ris.train import NonFiniteLossError, StopOnSignal, train_loop
from shared_ris.checkpoint import load_checkpoint, save_checkpoint
from shared_ris.train_state import rng_state, set_rng_state
from train_helpers import SMALL_MODEL, sigterm_after_step

# A Shared-RIS small enough that a step takes milliseconds on one CPU core.
SMALL = [
    "model.image_size=32", "model.max_text_len=8", *SMALL_MODEL,
    "train.warmup_steps=2", "train.log_every=1", "train.lr=1e-3",
]  # fmt: skip


def small_recipe(*overrides):
    return load_recipe("tiny", [*SMALL, *overrides])


class MemoryData:
    """Deterministic global batches of ``global_batch`` rows; rank r takes rows r·b … (r+1)·b − 1,
    exactly the rows a single process with batch ``global_batch`` would see at those positions."""

    def __init__(self, recipe, rank=0, world_size=1, samples=24, nan_at_step=None):
        self.b, self.rank = recipe.train.batch_size, rank
        self.global_batch = self.b * world_size
        self.batches_per_epoch = samples // self.global_batch
        self.samples, self.nan_at_step = samples, nan_at_step
        size, length = recipe.model.image_size, recipe.model.max_text_len
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(samples, 3, size, size, generator=g)
        self.text_ids = torch.randint(4, 60, (samples, length), generator=g)
        self.padding = torch.arange(length)[None] >= torch.randint(3, length, (samples, 1), generator=g)
        self.masks = (torch.rand(samples, 1, size, size, generator=g) > 0.6).float()

    def train_batches(self, epoch, start_batch):
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(epoch))
        for step in range(start_batch, self.batches_per_epoch):
            rows = order[step * self.global_batch :][self.rank * self.b : (self.rank + 1) * self.b]
            images = self.images[rows].clone()
            if self.nan_at_step == epoch * self.batches_per_epoch + step + 1:
                images[0, 0, 0, 0] = float("nan")
            yield {"images": images, "text_ids": self.text_ids[rows], "text_padding_mask": self.padding[rows], "masks": self.masks[rows]}

    def val_batches(self):
        return None


def final_weights(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


def assert_same_run(run_dir, reference_dir) -> None:
    """Bit for bit the same final weights and the same logged losses."""
    a, b = final_weights(reference_dir), final_weights(run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    assert losses(run_dir) == losses(reference_dir)


def losses(run_dir):
    import json

    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- LR schedule and parameter groups -----------------------------------------------------------------


def test_lr_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, 14, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 14, cfg) == 1.0  # first cosine step: the peak
    assert lr_at(13, 14, cfg) == pytest.approx(0.1)  # last step: min_lr
    midpoint = 4 + (14 - 4 - 1) / 2
    assert lr_at(int(midpoint), 14, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))
    no_warmup = TrainConfig(lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, 5, no_warmup) == 2.0 and lr_at(2, 5, no_warmup) == pytest.approx(1.0) and lr_at(4, 5, no_warmup) == 0.0
    assert lr_at(99, 5, no_warmup) == 0.0  # past the end it stays at min_lr


def test_no_weight_decay_on_norms_biases_positions_and_tokens():
    model = build_model(small_recipe())
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "beit3.encoder.embed_positions.A.weight" in plain and "beit3.encoder.embed_positions.B.weight" in plain
    assert "beit3.vision_embed.cls_token" in plain
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.bias" in plain
    assert "beit3.encoder.layers.0.self_attn_layer_norm.B.weight" in plain
    assert "decoder.upsample.0.2.weight" in plain  # BatchNorm scale
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in decayed
    assert "decoder.upsample.0.1.weight" in decayed and "fpn.fuse.weight" in decayed and "beit3.text_embed.weight" in decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    assert "beit3.vision_embed.mask_token" not in trainable  # frozen: never on RIS's path


def test_layer_decay_scales_encoder_layers():
    model = build_model(small_recipe())  # depth 2: embeddings 0, layers 1-2, heads 3
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.0, layer_decay=0.5) for n in g["names"]}
    assert scale["fpn.fuse.weight"] == 1.0 and scale["decoder.text_mlp.fc1.weight"] == 1.0
    assert scale["beit3.encoder.layers.1.ffn.A.fc1.weight"] == 0.5
    assert scale["beit3.encoder.layers.0.ffn.A.fc1.weight"] == 0.25
    assert scale["beit3.text_embed.weight"] == 0.125 and scale["beit3.encoder.embed_positions.A.weight"] == 0.125
    optimizer = build_optimizer(model, small_recipe("train.layer_decay=0.5").train)
    assert optimizer.defaults["betas"] == (0.9, 0.98)


# -- checkpoints --------------------------------------------------------------------------------------


def test_checkpoint_is_weights_only_and_restores_every_rng(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(
        {"model": {}, "optimizer": {}, "epoch": 0, "epoch_step": 0, "step": 0, "best_oiou": -1.0, "rng": [state], "recipe": {}},
        tmp_path / "c.pt",
    )
    assert not (tmp_path / "c.pt.tmp").exists()
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # raises if anything is not weights_only-safe
    set_rng_state(loaded["rng"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(again[0], expected[0])
    assert (again[1] == expected[1]).all() and again[2] == expected[2]


def test_not_a_training_checkpoint_is_one_line(tmp_path):
    from shared_ris.model import CheckpointError

    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a Shared-RIS training checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


# -- DDP: 2 processes × batch b ≡ 1 process × batch 2b --------------------------------------------------


def _ddp_worker(rank, world_size, port, recipe_dict, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = setup("cpu")
    try:
        recipe = recipe_from_dict(recipe_dict)
        train_loop(recipe, MemoryData(recipe, rank, world_size), out_dir, env=env)
    finally:
        teardown(env)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_twice_the_batch(tmp_path):
    steps = ["train.max_steps=4", "model.encoder.drop_path_rate=0.0", "train.sync_bn=true"]
    two = small_recipe("train.batch_size=2", *steps)
    mp.start_processes(_ddp_worker, args=(2, free_port(), two.to_dict(), tmp_path / "two"), nprocs=2, start_method="spawn")
    one = small_recipe("train.batch_size=4", *steps)
    train_loop(one, MemoryData(one), tmp_path / "one")

    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a softmax row equally, so its gradient is exactly 0;
            # what fp32 leaves is rounding noise, which Adam scales up to ~lr. Check q and v strictly.
            q, k, v = (a[key] - b[key]).abs().chunk(3)
            assert q.max() < 1e-5 and v.max() < 1e-5 and k.max() < one.train.lr * 4, key
            continue
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any("running_mean" in k for k in a)  # the sync-BN running statistics match too
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)


@pytest.mark.slow
def test_ddp_trains_an_fpn_that_skips_the_last_encoder_layer(tmp_path):
    # Without freezing layer 2 (never read), DDP would wait for its gradient and fail at step 2.
    recipe = small_recipe("train.batch_size=2", "train.max_steps=3", "model.fpn.stages=[1]")
    mp.start_processes(_ddp_worker, args=(2, free_port(), recipe.to_dict(), tmp_path / "two"), nprocs=2, start_method="spawn")
    torch.manual_seed(recipe.train.seed)
    initial = build_model(recipe).state_dict()
    state = load_checkpoint(tmp_path / "two" / "last.pt")
    assert state["step"] == 3
    for key, value in state["model"].items():
        if ".k_proj." in key and key.endswith("bias"):
            continue  # its true gradient is 0 (see above): changed or not, it proves nothing
        unchanged = torch.equal(value, initial[key])
        assert unchanged == (key.startswith("beit3.encoder.layers.1.") or "mask_token" in key or "encoder.layer_norm" in key), key


# -- SIGTERM and exact resume, NaN ----------------------------------------------------------------------


def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    recipe = small_recipe("train.batch_size=4", "train.epochs=2", "model.encoder.drop_path_rate=0.1")  # 12 steps
    data = MemoryData(recipe)
    train_loop(recipe, data, tmp_path / "whole")

    stopped = train_loop(recipe, data, tmp_path / "split", progress=sigterm_after_step(4))
    assert stopped["stopped"] and stopped["step"] == 5  # the signal lands after step 4; step 5 finishes, then it saves
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 5
    resumed = train_loop(recipe, data, tmp_path / "split", resume="auto")
    assert resumed["step"] == 12 and not resumed["stopped"]

    assert_same_run(tmp_path / "split", tmp_path / "whole")


def test_repeated_signals_stop_once_and_an_impatient_one_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(patience=0.2) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a copy from the launcher: still just a request
        assert stop.requested
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_nan_loss_saves_and_names_the_step(tmp_path):
    recipe = small_recipe("train.batch_size=4")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(epoch 0\); saved .*last.pt at step 2"):
        train_loop(recipe, MemoryData(recipe, nan_at_step=3), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_single_process_env_needs_no_process_group():
    env = setup("cpu")
    assert env == DistEnv() and not torch.distributed.is_initialized()
