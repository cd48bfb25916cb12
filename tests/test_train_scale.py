"""Training at scale on one device: gradient accumulation, activation checkpointing and the step
that never waits for the host (a non-finite loss still never changes the model)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from shared_ris.checkpoint import load_checkpoint
from shared_ris.distributed import DistEnv
from shared_ris.train import NonFiniteLossError, train_loop
from shared_ris.trainee import build_trainee, train_step
from test_train import MemoryData, assert_same_run, small_recipe


def batches_of(data: MemoryData, rows: slice) -> dict:
    return {"images": data.images[rows], "text_ids": data.text_ids[rows], "text_padding_mask": data.padding[rows], "masks": data.masks[rows]}


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Batch norm in eval mode: its statistics are then the same whatever the micro-batch size."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    data = MemoryData(small_recipe("train.batch_size=8"), samples=8)
    after = {}
    for name, overrides, micro in (("one", ["train.batch_size=8"], [slice(0, 8)]), ("four", ["train.batch_size=2", "train.accumulate_steps=4"],
                                                                                     [slice(i, i + 2) for i in range(0, 8, 2)])):  # fmt: skip
        recipe = small_recipe("model.encoder.drop_path_rate=0.0", *overrides)
        trainee = build_trainee(recipe, DistEnv())
        trainee.model.train()
        freeze_batchnorm(trainee.model)
        loss = train_step(trainee, [batches_of(data, rows) for rows in micro], recipe)
        # the (clipped) gradients the step applied; Adam's first update, lr·sign(g), would amplify rounding noise
        after[name] = (loss, {n: p.grad.clone() for n, p in trainee.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(after["four"][0], after["one"][0], atol=1e-6, rtol=1e-5)
    assert after["four"][1].keys() == after["one"][1].keys()
    for key, grad in after["one"][1].items():
        torch.testing.assert_close(after["four"][1][key], grad, atol=1e-7, rtol=1e-5, msg=key)


class SignalAtBatch(MemoryData):
    """Sends itself SIGTERM while handing out micro-batch ``at`` (counted from 1) of the first pass."""

    def __init__(self, recipe, at: int) -> None:
        super().__init__(recipe)
        self.at, self.handed = at, 0

    def train_batches(self, epoch, start_batch):
        for batch in super().train_batches(epoch, start_batch):
            self.handed += 1
            if self.handed == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_a_stop_in_the_middle_of_an_accumulation_resumes_exactly(tmp_path):
    recipe = small_recipe("train.batch_size=2", "train.accumulate_steps=2", "train.epochs=2", "train.log_every=2",
                          "model.encoder.drop_path_rate=0.1")  # fmt: skip  # 24 samples: 6 steps of 2 × 2 per epoch
    train_loop(recipe, MemoryData(recipe), tmp_path / "whole")
    stopped = train_loop(recipe, SignalAtBatch(recipe, at=5), tmp_path / "split")  # the first micro-batch of step 3
    assert stopped["stopped"] and stopped["step"] == 4  # step 3 finishes, the ranks agree at the check-in after step 4
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch_step"] == 4
    assert train_loop(recipe, MemoryData(recipe), tmp_path / "split", resume="auto")["step"] == 12
    assert_same_run(tmp_path / "split", tmp_path / "whole")


def test_checkpointed_blocks_give_the_same_gradients():
    recipe = small_recipe("model.encoder.drop_path_rate=0.2", "train.batch_size=4")  # drop path: the RNG must replay
    data = MemoryData(recipe)
    grads = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        trainee = build_trainee(recipe, DistEnv())
        trainee.model.set_activation_checkpointing(enabled)
        trainee.model.train()
        batch = batches_of(data, slice(0, 4))
        torch.manual_seed(1)
        logits = trainee.model(batch["images"], batch["text_ids"], batch["text_padding_mask"])
        torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.nn.functional.interpolate(batch["masks"], logits.shape[-2:])).backward()
        grads[enabled] = {n: p.grad.clone() for n, p in trainee.model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 20
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_a_steady_state_step_never_reads_the_device(monkeypatch):
    recipe = small_recipe("train.batch_size=4")
    trainee = build_trainee(recipe, DistEnv())
    assert trainee.sync_free  # the fused AdamW skips bad updates itself
    data = MemoryData(recipe)

    def refuse(*args, **kwargs):
        raise AssertionError("host read in a steady-state step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for step in range(1, 4):
        train_step(trainee, [batches_of(data, slice(4 * step, 4 * step + 4))], recipe, step=step)


def test_a_non_finite_loss_between_check_ins_changes_nothing(tmp_path):
    recipe = small_recipe("train.batch_size=4", "train.log_every=5")  # NaN at step 3, seen at the check-in after step 5
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(epoch 0\); saved .*last.pt at step 2"):
        train_loop(recipe, MemoryData(recipe, nan_at_step=3), tmp_path / "nan")
    saved = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["epoch_step"]) == (2, 0, 2)
    train_loop(small_recipe("train.batch_size=4", "train.max_steps=2"), MemoryData(recipe), tmp_path / "two")
    reference = load_checkpoint(tmp_path / "two" / "last.pt")
    for key, value in reference["model"].items():  # weights and batch-norm statistics, as after step 2
        torch.testing.assert_close(saved["model"][key], value, atol=0, rtol=0, msg=key)
    for index, state in reference["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(saved["optimizer"]["state"][index][name], value, atol=0, rtol=0)
