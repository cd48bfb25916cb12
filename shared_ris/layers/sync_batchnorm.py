"""Batch norm whose batch statistics span every process, on any device.

``torch.nn.SyncBatchNorm`` only runs on CUDA tensors; this one computes the statistics with a
differentiable all-reduce and so also runs over gloo on CPU, which is how the tests check that
2 processes × batch b train exactly like 1 process × 2b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output gradients.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated in torch 2.13;
    its functional successor only gained autograd recently.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with mean and variance over (N, H, W) of all ranks' batches.

    Two passes (sum and count, then the centred sum of squares) keep the numbers as close to
    single-process BatchNorm as fp32 allows. Running statistics update as in BatchNorm
    (unbiased variance). Outside training, or with one process, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) → (N, C, H, W)."""
        if not self.training or _world_size() == 1:
            return super().forward(x)
        xf = x.float()
        sums = torch.cat([xf.sum((0, 2, 3)), xf.new_tensor([x.numel() / x.shape[1]])])
        sums = AllReduceSum.apply(sums)
        count = sums[-1]
        mean = sums[:-1] / count
        centred = xf - mean[None, :, None, None]
        var = AllReduceSum.apply(centred.square().sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm2d for a synchronised one: torch's on CUDA, :class:`SyncBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.to(child.weight.device if child.affine else child.running_mean.device)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module

