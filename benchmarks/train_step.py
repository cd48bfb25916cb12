"""Throughput and peak memory of one optimizer step, variants side by side (base recipe at 480 px).

    python benchmarks/train_step.py [--recipe base] [--batch N] [--accumulate K] [--steps 5] [--warmup 2]
                                    [--variants eager,checkpointing,compile] [--json FILE]

The step is ``shared_ris.trainee.train_step``, the one ``sris train`` runs: K micro-batches of
forward (bf16 autocast on CUDA, fp32 on CPU), 2·BCE + 0.5·Dice and backward, then grad-clip 1.0
and AdamW — random weights, random inputs with a 20-token text. Default batch: 14 on a GPU (the
paper's per-GPU batch), 1 on the CPU. Each variant runs in a child process of its own, so its peak
memory is its own (CUDA: max allocated; CPU: max RSS of the process). Prints one JSON line per
variant, then a table with ratios against the first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from shared_ris import load_recipe
from shared_ris.distributed import DistEnv
from shared_ris.flops import dummy_batch
from shared_ris.trainee import build_trainee, train_step, wrap_for_training

VARIANTS = {
    "eager": [],
    "checkpointing": ["train.activation_checkpointing=true"],
    "compile": ["train.compile=true"],
    "compile+checkpointing": ["train.compile=true", "train.activation_checkpointing=true"],
}


def measure(recipe_name: str, variant: str, batch_size: int, accumulate: int, steps: int, warmup: int) -> dict:
    """Median step time and peak memory of ``variant``, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train() does
    recipe = load_recipe(recipe_name, [*VARIANTS[variant], f"train.accumulate_steps={accumulate}"])
    env = DistEnv(device=device)
    trainee = build_trainee(recipe, env)
    wrap_for_training(trainee, recipe, env)
    trainee.model.train()
    micro = [dummy_batch(recipe, batch_size, device, seed=i) for i in range(accumulate)]

    def step(number: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(trainee, micro, recipe, env, step=number)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(warmup):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step(warmup + i + 1) for i in range(steps)]
    median = statistics.median(times)
    images = batch_size * accumulate
    result = {
        "variant": variant, "recipe": recipe.name, "image_size": recipe.model.image_size, "batch": batch_size,
        "accumulate": accumulate, "amp": trainee.amp, "median_step_s": round(median, 4), "img_s": round(images / median, 2),
        "steps_s": [round(t, 4) for t in times],
    }  # fmt: skip
    if device.type == "cuda":
        result.update(device=torch.cuda.get_device_name(), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
    else:
        result.update(device=f"CPU, {torch.get_num_threads()} threads", peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    return result


def run_child(args: argparse.Namespace, variant: str, batch_size: int) -> dict:
    """``measure`` in a fresh process; a variant that runs out of memory reports ``{"oom": true}``."""
    command = [sys.executable, __file__, "--child", variant, "--recipe", args.recipe, "--batch", str(batch_size),
               "--accumulate", str(args.accumulate), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    oom = "out of memory" in done.stderr.lower()
    return {"variant": variant, "batch": batch_size, "oom": oom, "error": None if oom else done.stderr.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="base")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="eager,checkpointing")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_size = args.batch or (14 if torch.cuda.is_available() else 1)
    if args.child:
        print(json.dumps(measure(args.recipe, args.child, batch_size, args.accumulate, args.steps, args.warmup)))
        return
    results = [run_child(args, variant, batch_size) for variant in args.variants.split(",")]
    for result in results:
        print(json.dumps(result))
    base = results[0]
    print(f"{'variant':<24}{'step (s)':>10}{'img/s':>10}{'peak GiB':>10}{'time ×':>9}{'memory ×':>10}")
    for r in results:
        if "img_s" not in r:
            print(f"{r['variant']:<24}{'out of memory' if r.get('oom') else r.get('error')}")
            continue
        ratios = (r["median_step_s"] / base["median_step_s"], r["peak_gib"] / base["peak_gib"]) if "img_s" in base else (float("nan"),) * 2
        print(f"{r['variant']:<24}{r['median_step_s']:>10.3f}{r['img_s']:>10.2f}{r['peak_gib']:>10.2f}{ratios[0]:>9.2f}{ratios[1]:>10.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
