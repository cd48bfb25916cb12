"""The inference runtimes side by side: torch fp32 / bf16 and ONNX Runtime fp32 / int8, on CPU.

    python benchmarks/runtimes.py --recipe base --image-size 480 --train-steps 30 --batch-size 2 --out /tmp/rt
    python benchmarks/runtimes.py --recipe tiny --image-size 64 --train-steps 300 --batch-size 16 --out /tmp/rt-tiny
    python benchmarks/runtimes.py --checkpoint RUN/best.pt --images DIR --out /tmp/rt   # a run you have
    … --set train.lr=5e-4 --set data.num_workers=0   # recipe overrides for the short run

Without ``--checkpoint`` it trains a short run first (synthetic scenes at ``--image-size``, so the
weights give confident masks, unlike random ones on which agreement means nothing) and writes
``--images`` held-out scenes with a prompt each. Then it exports the run (``sris export``'s
library calls: fp32 and int8 ONNX, each verified) and runs every runtime in its own child process,
at 1 intra-op thread and at the default, predicting one image at a time:

- s/image: median over the images of ``Predictor.predict`` (after one warm-up image);
- speed-up: torch fp32's median / this one's, at the same thread count;
- IoU vs fp32: mean and min over the images of the mask's IoU with torch fp32's mask;
- peak RSS (MB): the child's maximum resident set (``VmHWM``; imports and model load included).

bf16 runs only where the CPU computes in bf16 (AVX512-BF16 / AMX); elsewhere its row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = [("torch", "fp32", "checkpoint"), ("torch", "bf16", "checkpoint"), ("onnx", "fp32", "fp32.onnx"), ("onnx", "int8", "int8.onnx")]


def train_short_run(out: Path, recipe_name: str, image_size: int, steps: int, batch: int, images: int, extra: list[str]) -> Path:
    """Synthetic data at ``image_size``, ``steps`` of training, ``images`` held-out scenes; → best.pt."""
    import shared_ris
    from shared_ris.data.synthetic import export_examples, prepare_synthetic
    from shared_ris.train import train

    overrides = [f"model.image_size={image_size}", f"train.max_steps={steps}", f"train.batch_size={batch}",
                 f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=100000", f"train.log_every={max(1, steps // 5)}",
                 "data.shuffle_buffer=100", *extra]  # fmt: skip
    if not (out / "run" / "best.pt").is_file():
        prepare_synthetic(out / "data", train=max(200, steps * batch), val=8, test=0, size=image_size, workers=1)
        started = time.perf_counter()
        train(shared_ris.load_recipe(recipe_name, overrides), out / "data", out / "run")
        print(f"trained {steps} steps of {recipe_name} at {image_size} in {time.perf_counter() - started:.0f} s", flush=True)
    export_examples(out / "examples", count=images, size=image_size, seed=7)
    return out / "run" / "best.pt"


def export_both(checkpoint: Path, out: Path, prompts: Path) -> None:
    from shared_ris.export import export_onnx

    for quantize, name in ((None, "fp32.onnx"), ("int8", "int8.onnx")):
        if (out / name).is_file():
            continue
        report = export_onnx(checkpoint, out / name, quantize=quantize, verify_prompts=prompts, min_iou=0.0)
        print(f"exported {name} in {report.seconds:.0f} s; verified on {report.agreement.describe()}", flush=True)


def child(spec: dict) -> None:
    """One runtime in this process: per-image seconds, the masks (npz), peak RSS → spec['result']."""
    import numpy as np
    import torch

    from shared_ris.predict import read_prompt_entries
    from shared_ris.predictor import Predictor, open_image

    torch.set_num_threads(spec["threads"])
    precision = "fp32" if spec["runtime"] == "onnx" else spec["precision"]  # an ONNX model runs as exported
    predictor = Predictor.from_checkpoint(spec["model"], runtime=spec["runtime"], precision=precision)
    entries = read_prompt_entries(Path(spec["prompts"]))
    folder = Path(spec["prompts"]).parent
    seconds, masks = [], {}
    for i, entry in enumerate([entries[0], *entries]):  # the first image twice: a warm-up
        image = open_image(folder / entry.file)
        started = time.perf_counter()
        [prediction] = predictor.predict([image], entry.text)
        if i:
            seconds.append(time.perf_counter() - started)
            masks[entry.file] = prediction.mask
    np.savez_compressed(spec["masks"], **masks)
    # VmHWM, not getrusage's ru_maxrss: that one survives execve, so it would report the parent's peak
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")) / 1024
    Path(spec["result"]).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def run_child(spec: dict) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"  {spec['runtime']} {spec['precision']}: failed: {done.stderr.strip().splitlines()[-1][:200]}", flush=True)
        return None
    return json.loads(Path(spec["result"]).read_text())


def iou_against(reference: Path, other: Path) -> list[float]:
    import numpy as np

    with np.load(reference) as ref, np.load(other) as oth:
        ious = []
        for key in ref.files:
            union = (ref[key] | oth[key]).sum()
            ious.append(float((ref[key] & oth[key]).sum() / union) if union else 1.0)
    return ious


def measure(checkpoint: Path, out: Path, prompts: Path, thread_counts: list[int]) -> list[dict]:
    from shared_ris.predictor import cpu_computes_bf16

    rows = []
    for threads in thread_counts:
        for runtime, precision, model in RUNTIMES:
            row = {"runtime": runtime, "precision": precision, "threads": threads}
            if precision == "bf16" and not cpu_computes_bf16():
                rows.append({**row, "skipped": "no bf16 instructions on this CPU"})
                continue
            name = f"{runtime}-{precision}-t{threads}"
            spec = {"model": str(checkpoint if model == "checkpoint" else out / model), "runtime": runtime, "precision": precision,
                    "threads": threads, "prompts": str(prompts), "masks": str(out / f"{name}.npz"), "result": str(out / f"{name}.json")}  # fmt: skip
            result = run_child(spec)
            rows.append({**row, **result, "masks": spec["masks"]} if result else {**row, "skipped": "failed"})
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{'runtime':8} {'prec':5} {'thr':>3} {'s/image':>8} {'speed-up':>8} {'IoU mean':>8} {'IoU min':>8} {'peak RSS MB':>11}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['runtime']:8} {row['precision']:5} {row['threads']:>3}  ({row['skipped']})")
            continue
        base = next(r for r in rows if r["threads"] == row["threads"] and r["runtime"] == "torch" and r["precision"] == "fp32")
        median = statistics.median(row["seconds"])
        ious = iou_against(Path(base["masks"]), Path(row["masks"]))
        speedup = statistics.median(base["seconds"]) / median
        print(f"{row['runtime']:8} {row['precision']:5} {row['threads']:>3} {median:8.3f} {speedup:7.2f}× "
              f"{statistics.mean(ious):8.4f} {min(ious):8.4f} {row['peak_rss_mb']:11.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sris-runtimes"))
    parser.add_argument("--checkpoint", type=Path, help="a trained run's best.pt (default: train a short run)")
    parser.add_argument("--images", type=Path, help="with --checkpoint: a folder with prompts.jsonl (default: generated scenes)")
    parser.add_argument("--recipe", default="base")
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--count", type=int, default=6, help="held-out scenes to predict")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a recipe override for the short run (repeatable)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated intra-op thread counts")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        checkpoint = train_short_run(args.out, args.recipe, args.image_size, args.train_steps, args.batch_size, args.count, args.overrides)
        prompts = args.out / "examples" / "prompts.jsonl"
    else:
        from shared_ris.data.synthetic import export_examples

        checkpoint = args.checkpoint
        images = args.images or export_examples(args.out / "examples", count=args.count, size=args.image_size, seed=7)
        prompts = images / "prompts.jsonl"
    export_both(checkpoint, args.out, prompts)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    report(measure(checkpoint, args.out, prompts, [int(t) for t in args.threads.split(",")]))


if __name__ == "__main__":
    main()
