"""Throughput and peak memory of ``sris predict`` on CPU, per recipe (random weights).

    python benchmarks/predict.py [--recipes base,tiny] [--images 8] [--batch-size 4] [--size 640x480] [--attention] [--repeat 1] [--threads 0]

For each recipe it writes a trained-format checkpoint with random weights and a small tokenizer,
then runs the real command (``python -m cli.main predict``) as a child process twice: on 1 image
and on ``--images`` + 1 images. Reported per recipe:

- wall (s): the whole command on ``--images`` + 1 images (start-up and checkpoint load included);
- images/s: ``--images`` / (wall of the long run − wall of the 1-image run), i.e. the steady rate
  once the checkpoint is loaded, reading, resizing, predicting and writing mask + overlay included;
- peak RSS (MB): the child's maximum resident set (``wait4``'s ru_maxrss) on the long run.

With ``--repeat N`` each run is made N times and the fastest is kept (the least disturbed by other
work on the machine); the load average before the runs is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared_ris import build_model, load_recipe
from shared_ris.checkpoint import save_trained
from shared_ris.data.synthetic import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, recipe_name: str) -> Path:
    folder.mkdir(parents=True)
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = build_model(recipe)
    checkpoint = save_trained(model, recipe, folder / "best.pt")
    train_tokenizer(folder / "spm.model")
    return checkpoint


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        noise = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)  # smooth-ish photo stand-in
        Image.fromarray(noise).resize((width, height), Image.BICUBIC).save(folder / f"img{i:03d}.jpg", quality=90)


def run_predict(images: Path, checkpoint: Path, out: Path, batch_size: int, attention: bool, threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one ``sris predict`` child process."""
    command = [sys.executable, "-m", "cli.main", "predict", str(images), "the red circle on the left",
               "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", str(batch_size), "--device", "cpu"]  # fmt: skip
    if attention:
        command.append("--attention")
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"sris predict failed:\n{errors.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="base,tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--attention", action="store_true", help="also write the three attention maps")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the command (0 = torch's default, one per core)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.images} images of {width}×{height}, batch {args.batch_size}, attention={args.attention}")  # fmt: skip
    print(f"{'recipe':<8} {'input':>6} {'wall (s)':>9} {'images/s':>9} {'peak RSS (MB)':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "many", args.images + 1, width, height)
        (tmp / "one").mkdir()
        (tmp / "one" / "img000.jpg").write_bytes((tmp / "many" / "img000.jpg").read_bytes())
        for name in args.recipes.split(","):
            checkpoint = write_run(tmp / name, name)
            size = load_recipe(name).model.image_size
            short = min(run_predict(tmp / "one", checkpoint, tmp / "out1", args.batch_size, args.attention, args.threads)[0] for _ in range(args.repeat))
            runs = [run_predict(tmp / "many", checkpoint, tmp / "out", args.batch_size, args.attention, args.threads) for _ in range(args.repeat)]
            wall, peak = min(r[0] for r in runs), max(r[1] for r in runs)
            rate = args.images / max(wall - short, 1e-9)
            print(f"{name:<8} {size:>6} {wall:>9.1f} {rate:>9.2f} {peak:>14.0f}", flush=True)
            checkpoint.unlink()


if __name__ == "__main__":
    main()
