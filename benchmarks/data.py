"""Data throughput: ``sris prepare`` (refs/s) and the training loader (samples/s) vs a refer-API baseline.

    python benchmarks/data.py [--refs 1200] [--size 480] [--workers 2] [--batch 8] [--runs 5]

A RefCOCO-like fixture is generated first (640×480 photos-like JPEGs, COCO polygons with 24-40
vertices, a protocol-2 refs pickle). Then, alternating, ``--runs`` times each:

- prepare: ``prepare_refer`` → shards, with ``--workers`` processes;
- loader: ``build_train_loader`` at ``--size`` px with ``--workers`` DataLoader workers (local shards:
  every ref once per epoch, read by index);
- stream: the same loader given the shards as a list of locations, which streams them as it does
  remote data (what the loader did for local shards too before the epoch sampler);
- baseline: what the refer API + LAVT's dataset do per ``__getitem__`` with the JSON loaded once:
  look up ref → annotation → image, open the image file, rasterise the polygons with pycocotools
  (refer's ``getMask``), pick a sentence, resize (bicubic / nearest), convert and normalise, through
  a map-style DataLoader with the same workers and batch size.

Loader and baseline each run one epoch (the same number of batches), taking turns at going first:
samples/s after the first batch (worker start-up excluded) and CPU ms per sample of the whole
epoch, workers included (robust on a shared machine). Prints medians and the loader/baseline ratios
(> 1 means the shard loader is faster).
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from shared_ris import Tokenizer, load_recipe
from shared_ris.data import build_train_loader, prepare_refer
from shared_ris.data.synthetic import train_tokenizer

WIDTH, HEIGHT = 640, 480


def _polygon(rng: np.random.Generator) -> list[float]:
    cx, cy = rng.uniform(120, WIDTH - 120), rng.uniform(100, HEIGHT - 100)
    n = int(rng.integers(24, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(40, 110, n)
    return [float(v) for a, r in zip(angles, radii) for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def _photo(rng: np.random.Generator, polygons: list[list[float]]) -> Image.Image:
    """Smooth gradients, filled shapes and sensor-like noise: JPEGs of a realistic size (~60-90 kB)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(40, 120) + c) * 60 + np.cos(yy / rng.uniform(40, 120)) * 50 + 120 for c in range(3)], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for poly in polygons:
        draw.polygon(poly, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def build_fixture(root: Path, refs: int, refs_per_image: int = 3) -> tuple[Path, Path, Path]:
    """refer_root/refcoco/{refs(unc).p, instances.json} and a train2014 folder; returns them and instances."""
    rng = np.random.default_rng(0)
    refer_root, images_dir = root / "refer", root / "train2014"
    (refer_root / "refcoco").mkdir(parents=True)
    images_dir.mkdir()
    images, anns, ref_list = [], [], []
    for image_id in range((refs + refs_per_image - 1) // refs_per_image):
        polygons = [[_polygon(rng)] for _ in range(refs_per_image)]
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _photo(rng, [p[0] for p in polygons]).save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
        for k, segmentation in enumerate(polygons):
            ann_id = image_id * 10 + k
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": segmentation, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1.0})
            ref_id = len(ref_list)
            sentences = [{"sent_id": ref_id * 10 + j, "sent": f"the object number {ref_id} variant {j}", "raw": f"The object number {ref_id}, variant {j}.", "tokens": []} for j in range(3)]
            ref_list.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": "train", "sentences": sentences, "category_id": 1, "sent_ids": [], "file_name": name})
    instances = refer_root / "refcoco" / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(ref_list[:refs], protocol=2))
    return refer_root, images_dir, instances


class ReferBaseline(torch.utils.data.Dataset):
    """LAVT's ``ReferDataset`` shape: JSON + refs loaded once, every sample decoded from scratch."""

    def __init__(self, refer_root: Path, images_dir: Path, instances: Path, size: int, tokenizer: Tokenizer) -> None:
        coco = json.loads(instances.read_text())
        self.images = {im["id"]: im for im in coco["images"]}
        self.anns = {a["id"]: a for a in coco["annotations"]}
        with open(refer_root / "refcoco" / "refs(unc).p", "rb") as f:
            self.refs = [r for r in pickle.load(f) if r["split"] == "train"]  # trusted: we wrote it above
        self.images_dir, self.size, self.tokenizer = images_dir, size, tokenizer

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple:
        ref = self.refs[index]
        ann, meta = self.anns[ref["ann_id"]], self.images[ref["image_id"]]
        image = Image.open(self.images_dir / meta["file_name"]).convert("RGB")
        rle = mask_utils.frPyObjects(ann["segmentation"], meta["height"], meta["width"])
        mask = np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)  # refer API getMask
        text = random.choice(ref["sentences"])["sent"]
        image = image.resize((self.size, self.size), Image.BICUBIC)
        mask = Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
        pixels = (pixels - 0.5) / 0.5
        ids, padding = self.tokenizer(text)
        return pixels, torch.from_numpy(np.asarray(mask, np.float32))[None], ids[0], padding[0]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epoch(make_batches) -> tuple[float, float]:
    """(samples/s after the first batch, CPU ms per sample over the whole epoch, start-up included).

    Wall-clock throughput is what training sees; CPU time per sample is the figure that other
    programs on a shared machine cannot bend.
    """
    cpu_start = _cpu_seconds()
    iterator = iter(make_batches())
    samples = len(_keys(next(iterator)))
    start, timed = time.perf_counter(), 0
    for batch in iterator:
        timed += len(_keys(batch))
    elapsed = time.perf_counter() - start
    del iterator  # joins the workers, so their CPU time is counted
    gc.collect()
    return timed / elapsed, 1000 * (_cpu_seconds() - cpu_start) / (samples + timed)


def _keys(batch) -> list:
    return batch["keys"] if isinstance(batch, dict) else batch[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=1200)
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="sris-bench-data-"))
    try:
        refer_root, images_dir, instances = build_fixture(root, args.refs)
        tokenizer = Tokenizer(train_tokenizer(root / "spm.model"), max_len=20)
        recipe = load_recipe("base", [f"model.image_size={args.size}", f"train.batch_size={args.batch}", f"data.num_workers={args.workers}"])
        baseline_set = ReferBaseline(refer_root, images_dir, instances, args.size, tokenizer)
        results = {name: [] for name in ("prepare", "loader", "stream", "baseline", "loader_cpu", "stream_cpu", "baseline_cpu")}
        for run in range(args.runs):
            start = time.perf_counter()
            prepare_refer("refcoco", refer_root, images_dir, root / "shards", shard_size=50, workers=args.workers, overwrite=True)
            results["prepare"].append(args.refs / (time.perf_counter() - start))
            shard_paths = sorted(str(p) for p in (root / "shards").glob("*-train-*.tar"))
            contenders = {
                "loader": lambda: build_train_loader(root / "shards", recipe, tokenizer, epoch=run),
                "stream": lambda: build_train_loader(root / "shards", recipe, tokenizer, epoch=run, shards=shard_paths),
                "baseline": lambda: torch.utils.data.DataLoader(baseline_set, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True),
            }
            for name in sorted(contenders, reverse=run % 2 == 1):  # alternate the order
                rate, cpu = timed_epoch(contenders[name])
                results[name].append(rate)
                results[f"{name}_cpu"].append(cpu)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
        median = {k: statistics.median(v) for k, v in results.items()}
        paired = statistics.median(a / b for a, b in zip(results["loader"], results["baseline"]))
        print(f"\n{args.refs} refs, 640x480 JPEGs, {args.workers} workers, batch {args.batch}, {args.size} px, median of {args.runs}")
        print(f"prepare   {median['prepare']:8.1f} refs/s")
        print(f"loader    {median['loader']:8.1f} samples/s   {median['loader_cpu']:6.2f} CPU ms/sample   (every ref once per epoch, by index)")
        print(f"stream    {median['stream']:8.1f} samples/s   {median['stream_cpu']:6.2f} CPU ms/sample   (the streaming loader)")
        print(f"baseline  {median['baseline']:8.1f} samples/s   {median['baseline_cpu']:6.2f} CPU ms/sample   (refer API + LAVT-style dataset)")
        print(f"ratio     {median['loader'] / median['baseline']:8.2f} x (samples/s; median of per-run ratios {paired:.2f} x)"
              f"   {median['baseline_cpu'] / median['loader_cpu']:.2f} x less CPU per sample")
        print(f"loader / stream {median['loader'] / median['stream']:.2f} x samples/s, {median['stream_cpu'] / median['loader_cpu']:.2f} x less CPU per sample")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
