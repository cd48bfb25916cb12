"""Forward latency of the base Shared-RIS at 480 px on CPU: SDPA attention vs the naive reference.

    python benchmarks/encoder.py [--recipe base] [--runs 5] [--batch 1] [--threads N]

Runs alternate between the two paths (same weights, same inputs) so both see the same machine
state; prints the median of each and the naive/SDPA ratio (> 1 means SDPA is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shared_ris import build_model, load_recipe
from shared_ris.flops import dummy_inputs
from shared_ris.layers import attention as attention_layer
from shared_ris.model import beit3 as beit3_module


FUSED_SDPA = attention_layer.sdpa
CALLS = {"sdpa": 0, "naive": 0}


def fused_sdpa(q, k, v, key_padding_mask):
    CALLS["sdpa"] += 1
    return FUSED_SDPA(q, k, v, key_padding_mask)


def naive_sdpa(q, k, v, key_padding_mask):
    CALLS["naive"] += 1
    return attention_layer.attention_naive(q, k, v, key_padding_mask)[0]


def use_attention(kind: str) -> None:
    """Point the encoder's and the FPN/decoder's attention at one implementation."""
    fn = fused_sdpa if kind == "sdpa" else naive_sdpa
    beit3_module.sdpa = fn
    attention_layer.sdpa = fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="base")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    model = build_model(recipe).eval()
    inputs = dummy_inputs(recipe, args.batch)
    times = {"sdpa": [], "naive": []}
    with torch.inference_mode():
        for kind in ("sdpa", "naive"):  # warm-up, and check both paths compute the same thing
            use_attention(kind)
            out = model(*inputs)
            times.setdefault("out_" + kind, out)
        diff = (times.pop("out_sdpa") - times.pop("out_naive")).abs().max().item()
        for _ in range(args.runs):
            for kind in ("sdpa", "naive"):
                use_attention(kind)
                start = time.perf_counter()
                model(*inputs)
                times[kind].append(time.perf_counter() - start)
    beit3_module.sdpa = attention_layer.sdpa = FUSED_SDPA
    assert CALLS["sdpa"] == CALLS["naive"] > 0, CALLS  # both paths really ran, equally often
    sdpa_ms, naive_ms = (statistics.median(times[k]) * 1e3 for k in ("sdpa", "naive"))
    print(f"recipe={recipe.name} image={recipe.model.image_size} text={recipe.model.max_text_len} batch={args.batch} "
          f"threads={torch.get_num_threads()} runs={args.runs} torch={torch.__version__}")
    print(f"forward median  sdpa: {sdpa_ms:8.1f} ms   naive: {naive_ms:8.1f} ms   naive/sdpa: {naive_ms / sdpa_ms:.2f}x")
    print(f"max |logit difference| between paths: {diff:.2e}")


if __name__ == "__main__":
    main()
