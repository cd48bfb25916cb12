"""Training throughput and peak memory of one optimizer step, base recipe at 480 px.

    python benchmarks/train_step.py [--recipe base] [--batch N] [--steps 5] [--warmup 2]

The step is ``shared_ris.train.train_step``, the one ``sris train`` runs: forward (bf16 autocast
on CUDA, fp32 on CPU), 2·BCE + 0.5·Dice, the losses read back, backward, grad-clip 1.0, AdamW —
random weights, random inputs with a 20-token text. Default batch: 14 on a GPU (the paper's per-GPU batch), 1 on the CPU.
Prints the median step time, img/s and peak memory (CUDA: max allocated; CPU: max RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from shared_ris import load_recipe
from shared_ris.distributed import DistEnv
from shared_ris.train import build_trainee, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="base")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train() does
    recipe = load_recipe(args.recipe)
    batch_size = args.batch or (14 if device.type == "cuda" else 1)
    size, length = recipe.model.image_size, recipe.model.max_text_len

    trainee = build_trainee(recipe, DistEnv(device=device), pretrained=None, notify=print)
    batch = {
        "images": torch.randn(batch_size, 3, size, size, device=device),
        "text_ids": torch.randint(4, min(1000, recipe.model.encoder.vocab_size), (batch_size, length), device=device),
        "text_padding_mask": torch.zeros(batch_size, length, dtype=torch.bool, device=device),
        "masks": (torch.rand(batch_size, 1, size, size, device=device) > 0.7).float(),
    }

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(trainee, batch, recipe)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    median = statistics.median(times)
    if device.type == "cuda":
        peak = {"peak_cuda_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        where = torch.cuda.get_device_name()
    else:
        peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        where = f"CPU, {torch.get_num_threads()} threads"
    print(json.dumps({
        "recipe": recipe.name, "image_size": size, "batch": batch_size, "amp": trainee.amp, "device": where,
        "median_step_s": round(median, 3), "img_s": round(batch_size / median, 2), **peak,
        "steps_s": [round(t, 3) for t in times],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
