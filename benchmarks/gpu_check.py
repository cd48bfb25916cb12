"""The figures of the one-command GPU check (``benchmarks/gpu_check.sh`` runs this after the CUDA tests).

    python benchmarks/gpu_check.py --out DIR [--deadline SECONDS]

Writes ``DIR/gpu_check.json`` after every stage (a stage cut short by the deadline is skipped, what
was measured stays):

- ``environment``: GPU, torch, CUDA, memory;
- ``matmul``: a measured 8192³ bf16 matmul (TFLOP/s), and the GPU's spec dense bf16 peak when known;
- ``flops``: fvcore multiply-adds per image-expression pair (``sris flops``), × 2 (MAC → FLOP) × 3
  (forward + backward) per trained image;
- ``steps``: the base train step at 480 px, batch 14, bf16 — eager / compile / checkpointing: img/s,
  achieved TFLOP/s, MFU against the spec peak and against the measured matmul, peak memory;
- ``max_batch``: the largest per-GPU batch whose measured peak fits 24 GiB and 40 GiB, eager and with
  checkpointing (peaks at two batches fit a line, the candidate is then measured);
- ``train_loop``: a real ``sris train`` on a 480-px synthetic set with 4 and 8 loader workers, img/s
  against the bare eager step (is the loader the bottleneck?);
- ``inference``: evaluation and prediction throughput in bf16 at batch 32;
- ``projection``: the paper recipe (35 epochs × 42,404 RefCOCO refs) on this one GPU, in hours.

Without a GPU the same stages run at tiny sizes on the CPU (a dry run) and write the same keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import run_child  # noqa: E402

PAPER_IMAGES = 35 * 42404  # the paper's recipe: 35 epochs of RefCOCO's train refs, one sentence each
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' spec sheets, matched on the device name.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}  # fmt: skip


class Check:
    """The results so far, written after every stage; stages past the deadline are skipped."""

    def __init__(self, out: Path, deadline: float, gpu: bool) -> None:
        self.out, self.deadline, self.gpu = out, time.time() + deadline, gpu
        self.results: dict = {"gpu": gpu, "skipped": []}
        # the CPU dry run: the same stages at tiny sizes ("limits" in GiB of peak RSS there)
        self.size = dict(recipe="base", batch=14, ladder=(2, 8), limits=(24, 40)) if gpu else dict(recipe="tiny", batch=4, ladder=(2, 8), limits=(0.6, 0.8))

    def stage(self, name: str, fn, needs: float) -> None:
        left = self.deadline - time.time()
        if left < needs:
            self.results["skipped"].append(f"{name} (needs ~{needs:.0f} s, {left:.0f} s left)")
        else:
            started = time.time()
            try:
                self.results[name] = fn()
            except Exception as exc:  # a stage that fails must not lose the others
                self.results[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:] }"}
            print(f"[{name}] {time.time() - started:.0f} s: {json.dumps(self.results[name])[:400]}", flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1) + "\n")


def environment() -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1), sm=f"{props.major}.{props.minor}")
    else:
        info.update(device=f"CPU, {torch.get_num_threads()} threads")
    return info


def matmul(gpu: bool) -> dict:
    n, dtype, device = (8192, torch.bfloat16, "cuda") if gpu else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(12):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = 2 * n**3 / statistics.median(times[2:]) / 1e12
    name = torch.cuda.get_device_name() if gpu else ""
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    return {"n": n, "dtype": str(dtype), "measured_tflops": round(measured, 3), "spec_bf16_tflops": spec}


def flops(recipe_name: str) -> dict:
    from shared_ris import load_recipe
    from shared_ris.flops import count_flops

    report = count_flops(load_recipe(recipe_name))
    macs = report["components"]["total"]["gflops"] * 1e9
    return {"gmacs_per_image": round(macs / 1e9, 2), "train_tflop_per_image": round(6 * macs / 1e12, 5)}


def steps(check: Check) -> dict:
    size, out = check.size, {}
    args = argparse.Namespace(recipe=size["recipe"], accumulate=1, steps=5 if check.gpu else 2, warmup=3 if check.gpu else 1)
    train_flop = check.results.get("flops", {}).get("train_tflop_per_image")
    matmul_rate = check.results.get("matmul", {})
    for variant in ("eager", "checkpointing", "compile"):
        result = run_child(args, variant, size["batch"])
        if "img_s" in result and train_flop:
            tflops = result["img_s"] * train_flop
            result["tflops"] = round(tflops, 3)
            if matmul_rate.get("measured_tflops"):
                result["mfu_measured_matmul"] = round(tflops / matmul_rate["measured_tflops"], 3)
            if matmul_rate.get("spec_bf16_tflops"):
                result["mfu_spec"] = round(tflops / matmul_rate["spec_bf16_tflops"], 3)
        out[variant] = result
    return out


def peak_at(check: Check, variant: str, batch: int) -> float | None:
    args = argparse.Namespace(recipe=check.size["recipe"], accumulate=1, steps=1, warmup=1)
    result = run_child(args, variant, batch)
    return result.get("peak_gib")


def max_batch(check: Check) -> dict:
    """Two measured peaks fit peak = fixed + slope · batch; each candidate is then measured."""
    out = {}
    low, high = check.size["ladder"]
    for variant in ("eager", "checkpointing"):
        if time.time() > check.deadline:  # each measurement is a child process: stop between them
            out[variant] = {"skipped": "deadline"}
            continue
        peaks = {b: peak_at(check, variant, b) for b in (low, high)}
        if None in peaks.values():
            out[variant] = {"peaks_gib": peaks, "error": "a ladder batch did not run"}
            continue
        slope = (peaks[high] - peaks[low]) / (high - low)
        fixed = peaks[low] - slope * low
        out[variant] = {"peaks_gib": peaks, "gib_per_image": round(slope, 3)}
        for limit in check.size["limits"]:
            if time.time() > check.deadline:
                break
            batch = max(1, int((limit - fixed) / slope))
            peak = peak_at(check, variant, batch)
            while batch > 1 and (peak is None or peak > limit):  # the fit was optimistic: measure one lower
                batch -= 1
                peak = peak_at(check, variant, batch)
            out[variant][f"fits_{limit:g}_gib"] = {"batch": batch, "measured_peak_gib": peak}
    return out


def sris(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True)


def synthetic_set(check: Check, work: Path) -> dict:
    """A synthetic set at the recipe's image size: enough refs for ~30 steps, and 64 loose images."""
    image, steps = (480, 30) if check.gpu else (128, 6)
    refs = check.size["batch"] * (steps + 1)
    started = time.time()
    done = sris("prepare", "synthetic", "--out", str(work / "data"), "--train", str(refs), "--val", "16", "--test", "0",
                "--size", str(image), "--examples", "64" if check.gpu else "8")  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return {"image_size": image, "train_refs": refs, "steps": steps, "prepare_s": round(time.time() - started, 1)}


def train_loop(check: Check, work: Path) -> dict:
    data = check.results["synthetic_set"]
    out = {}
    for workers in (4, 8):
        run = work / f"run{workers}"
        done = sris("train", "--data", str(work / "data"), "--recipe", check.size["recipe"], "--out", str(run),
                    "--set", f"train.batch_size={check.size['batch']}", "--set", f"train.max_steps={data['steps']}",
                    "--set", f"data.num_workers={workers}", "--set", "train.log_every=5", "--set", f"model.image_size={data['image_size']}")  # fmt: skip
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
        rates = [line["img_s"] for line in lines if "img_s" in line][1:]  # the first interval holds start-up
        out[f"workers_{workers}"] = {"img_s": round(statistics.median(rates), 2) if rates else None, "returncode": done.returncode}
        bare = check.results.get("steps", {}).get("eager", {}).get("img_s")
        if bare and rates:
            out[f"workers_{workers}"]["of_bare_step"] = round(out[f"workers_{workers}"]["img_s"] / bare, 3)
    return out


def inference(check: Check, work: Path) -> dict:
    """The model alone in bf16 at batch 32, then ``sris eval`` and ``sris predict`` end to end."""
    from shared_ris import build_model, load_recipe
    from shared_ris.checkpoint import save_trained
    from shared_ris.device import autocast
    from shared_ris.flops import dummy_inputs

    device, batch = torch.device("cuda" if check.gpu else "cpu"), 32 if check.gpu else 4
    recipe = load_recipe(check.size["recipe"], [f"model.image_size={check.results['synthetic_set']['image_size']}"])
    model = build_model(recipe).to(device).eval()
    checkpoint = save_trained(model, recipe, work / "random" / "best.pt")
    inputs = tuple(t.to(device) for t in dummy_inputs(recipe, batch))
    times = []
    with torch.inference_mode(), autocast(device, "bf16"):
        for _ in range(8 if check.gpu else 3):
            if check.gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*inputs)
            if check.gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    out = {"batch": batch, "forward_amp": "bf16" if check.gpu else "fp32", "forward_img_s": round(batch / statistics.median(times[1:]), 1)}
    started = time.time()
    done = sris("eval", "-c", str(checkpoint), "-d", str(work / "data"), "-s", "train", "--batch-size", str(batch), "--workers", "4",
                "--json", str(work / "eval.json"))  # fmt: skip
    n = json.loads((work / "eval.json").read_text())["splits"]["train"]["n"] if done.returncode == 0 else None
    out.update(eval_expressions=n, eval_wall_s=round(time.time() - started, 1))
    started = time.time()
    done = sris("predict", str(work / "data" / "examples"), "--prompts", str(work / "data" / "examples" / "prompts.jsonl"),
                "-c", str(checkpoint), "--tokenizer", str(work / "data" / "spm.model"), "--out", str(work / "predictions"),
                "--batch-size", str(batch), "--device", device.type)  # fmt: skip
    out.update(predict_images=len(list((work / "predictions").glob("*.mask.png"))), predict_wall_s=round(time.time() - started, 1),
               predict_returncode=done.returncode)  # fmt: skip
    return out


def projection(check: Check) -> dict:
    out = {"paper_images": PAPER_IMAGES}
    for name, result in check.results.get("steps", {}).items():
        if isinstance(result, dict) and result.get("img_s"):
            out[f"{name}_hours"] = round(PAPER_IMAGES / result["img_s"] / 3600, 2)
    loop = check.results.get("train_loop", {}).get("workers_8", {})
    if isinstance(loop, dict) and loop.get("img_s"):
        out["train_loop_eager_hours"] = round(PAPER_IMAGES / loop["img_s"] / 3600, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=420, help="seconds for all stages together")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.deadline, torch.cuda.is_available())
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check.stage("environment", environment, 0)
    check.stage("matmul", lambda: matmul(check.gpu), 5)
    check.stage("flops", lambda: flops(check.size["recipe"]), 10)
    check.stage("steps", lambda: steps(check), 90)
    check.stage("synthetic_set", lambda: synthetic_set(check, work), 30)
    check.stage("train_loop", lambda: train_loop(check, work), 90)
    check.stage("inference", lambda: inference(check, work), 30)
    check.stage("max_batch", lambda: max_batch(check), 90)
    check.stage("projection", lambda: projection(check), 0)


if __name__ == "__main__":
    main()
