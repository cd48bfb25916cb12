"""What one optimizer step updates, and the step itself: k micro-batches (gradient accumulation),
one AdamW update, no host-device synchronisation.

A non-finite loss must never change the model. The step cannot ask the host (that would stall the
GPU every step), so the decision is taken on the device by :class:`NonFiniteGuard`: from the first
step whose global loss is not finite on, AdamW skips its update (the fused kernel's ``found_inf``)
and batch-norm statistics are put back as they were before the step. The host reads the verdict
when the loop checks in (every ``train.log_every`` steps and at every epoch end) and then stops the
run, saving the state from before that step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import Recipe
from .device import amp_for, autocast
from .distributed import DistEnv
from .layers.sync_batchnorm import convert_sync_batchnorm
from .model import SharedRIS, build_model, segmentation_loss
from .optim import build_optimizer

LOSS_KEYS = ("loss", "bce", "dice")
NO_TARGET_KEY = "no_target"  # the head's BCE, logged after LOSS_KEYS when the model has one


class NonFiniteGuard:
    """A sticky, on-device verdict "some step since the start had a non-finite global loss".

    ``first_bad`` is the number of the first such step (-1: none). While the verdict holds, every
    step is undone on the device: the optimizer's update is skipped and the model's buffers (the
    batch-norm running statistics) are restored from their copy taken before the step."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.bad = torch.zeros((), device=device)  # float 0/1: what the fused AdamW reads as found_inf
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_loss = torch.zeros((), device=device)
        self.buffers = [buffer for buffer in model.buffers()]
        self.saved: list[torch.Tensor] = []

    def before_step(self) -> None:
        self.saved = [buffer.clone() for buffer in self.buffers]  # a few KB: the decoder's BN statistics

    def judge(self, global_loss: torch.Tensor, step: int) -> torch.Tensor:
        """Fold this step's global loss into the verdict; return the verdict (device tensor)."""
        bad_now = (~torch.isfinite(global_loss)).to(self.bad.dtype)
        first = (self.bad == 0) & (bad_now > 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.first_bad_loss = torch.where(first, global_loss.float(), self.first_bad_loss)
        self.bad = torch.maximum(self.bad, bad_now)
        return self.bad

    def after_step(self) -> None:
        keep = self.bad > 0
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(torch.where(keep, saved, buffer))

    def verdict(self) -> tuple[int, float] | None:
        """(the first non-finite step, its loss), or None. Reads the device: call it at check-ins."""
        first = int(self.first_bad.item())
        return (first, float(self.first_bad_loss.item())) if first >= 0 else None


@dataclass
class Trainee:
    """The model, the module the step calls (DDP and/or compiled wrapper, else the model itself),
    AdamW, the fp16 loss scaler (disabled otherwise), the device, the precision and the guard.

    ``sync_free``: the fused AdamW skips a bad update on the device; without it (fp16's loss scaler,
    a non-fused optimizer) the step reads the verdict on the host before updating."""

    model: SharedRIS
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str
    guard: NonFiniteGuard

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return LOSS_KEYS + ((NO_TARGET_KEY,) if self.model.no_target_head is not None else ())

    @property
    def sync_free(self) -> bool:
        return bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()

    def state_dicts(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}


def build_trainee(recipe: Recipe, env: DistEnv, pretrained=None, notify=lambda event: None) -> Trainee:
    """The same initial weights on every rank (DDP also broadcasts rank 0's when it wraps)."""
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe)
    if pretrained is not None:
        notify({"event": "message", "text": model.load_pretrained(pretrained, verbose=False).summary()})
    if env.distributed and recipe.train.sync_bn:
        model = convert_sync_batchnorm(model, env.device)
    model.set_activation_checkpointing(recipe.train.activation_checkpointing)
    model.to(env.device)
    optimizer = build_optimizer(model, recipe.train)
    amp = amp_for(env.device, recipe.train.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    forward = model if model.no_target_head is None else WithNoTarget(model)
    return Trainee(model, forward, optimizer, scaler, env.device, amp, NonFiniteGuard(model, env.device))


class WithNoTarget(nn.Module):
    """What training calls (and DDP wraps) when the model has a no-target head: a ``forward``
    giving both outputs, since DDP synchronises through ``forward`` only."""

    def __init__(self, model: SharedRIS) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_no_target(images, text_ids, text_padding_mask)


def wrap_for_training(trainee: Trainee, recipe: Recipe, env: DistEnv) -> None:
    """DDP across processes, then ``torch.compile`` when the recipe asks for it."""
    if env.distributed:
        device_ids = [env.device] if env.device.type == "cuda" else None
        trainee.ddp = nn.parallel.DistributedDataParallel(trainee.ddp, device_ids=device_ids)
    if recipe.train.compile:
        trainee.ddp = torch.compile(trainee.ddp)


def _forward_loss(trainee: Trainee, batch: dict, recipe: Recipe) -> dict[str, torch.Tensor]:
    device = trainee.device
    with autocast(device, trainee.amp):
        outputs = trainee.ddp(
            batch["images"].to(device, non_blocking=True),
            batch["text_ids"].to(device, non_blocking=True),
            batch["text_padding_mask"].to(device, non_blocking=True),
        )
    logits, no_target_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
    parts = segmentation_loss(logits, batch["masks"].to(device, non_blocking=True), recipe.loss.bce_weight, recipe.loss.dice_weight)
    if no_target_logits is not None:  # ReLA's no-target branch: BCE beside the mask loss
        labels = batch["no_target"].to(device, non_blocking=True).float()
        parts[NO_TARGET_KEY] = F.binary_cross_entropy_with_logits(no_target_logits.float(), labels)
        parts["loss"] = parts["loss"] + recipe.loss.no_target_weight * parts[NO_TARGET_KEY]
    return parts


def _mean_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """On the device: a collective, not a host round trip."""
    if env.distributed:
        dist.all_reduce(values)
        values /= env.world_size
    return values


def train_step(trainee: Trainee, micro_batches: list[dict], recipe: Recipe, env: DistEnv = DistEnv(), step: int = 1) -> torch.Tensor:
    """Optimizer step number ``step`` on this rank's micro-batches; every rank calls it together.

    Each micro-batch: forward under autocast, 2·BCE + 0.5·Dice divided by the number of
    micro-batches, backward (DDP synchronises gradients on the last one only). Then the global mean
    losses (one all-reduce on the device), the guard's verdict, clipping and AdamW, skipped on the
    device when the verdict is bad. Returns the global means of ``trainee.loss_keys`` (loss, bce, dice
    and, with a no-target head, its BCE) as a device tensor.
    """
    count = len(micro_batches)
    trainee.guard.before_step()
    trainee.optimizer.zero_grad(set_to_none=True)
    keys = trainee.loss_keys
    losses = torch.zeros(len(keys), device=trainee.device)
    for i, batch in enumerate(micro_batches):
        last = i == count - 1
        with contextlib.nullcontext() if last or not hasattr(trainee.ddp, "no_sync") else trainee.ddp.no_sync():
            parts = _forward_loss(trainee, batch, recipe)
            trainee.scaler.scale(parts["loss"] / count).backward()
        losses += torch.stack([parts[key].detach().float() for key in keys]) / count
    losses = _mean_across_ranks(losses, env)
    bad = trainee.guard.judge(losses[0], step)
    if recipe.train.grad_clip > 0:
        trainee.scaler.unscale_(trainee.optimizer)
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), recipe.train.grad_clip)
    if trainee.sync_free:
        trainee.optimizer.found_inf = bad  # the fused kernel skips the whole update when it is 1
        trainee.optimizer.step()
    elif not bad.item():  # fp16 / non-fused: the host decides
        trainee.scaler.step(trainee.optimizer)
        trainee.scaler.update()
    trainee.guard.after_step()
    return losses
