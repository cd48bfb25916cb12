"""Does it learn, and does it use the words? Synthetic set → train ``tiny`` → val mIoU, twice.

    python benchmarks/quickstart.py [--out demo/quickstart] [--spatial] [--set train.epochs=10 …]

1. ``prepare_synthetic`` with its default sizes (4000 train / 300 val refs, 128 px), kept if present;
   ``--spatial`` prepares the variant with relational expressions ("the leftmost red one") too.
2. ``train`` the ``tiny`` recipe from scratch (one process, all cores).
3. Score the final weights on every val expression, then again with the expressions shuffled across
   the val set (images and masks kept). Every synthetic target shares its colour with one object and
   its shape with another, so a model that ignores the text cannot beat the shuffled figure.

Prints both mIoUs, their ratio, the wall times and the CPU seconds of training (on a busy machine
wall time stretches, CPU time much less: CPU s / 2 is what 2 idle cores would take). Targets:
mIoU ≥ 0.6 and ≥ 2× the shuffled mIoU, training within 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from shared_ris import Tokenizer, build_model, load_recipe
from shared_ris.data import build_eval_loader, prepare_synthetic
from shared_ris.data.synthetic import RELATION_WORDS
from shared_ris.evaluate import evaluate_model
from shared_ris.train import train
from shared_ris.checkpoint import load_checkpoint


def shuffled_expressions(batches: list[dict], seed: int = 0) -> list[dict]:
    """The same batches with every expression (ids and padding) moved to another row of the set."""
    ids = torch.cat([b["text_ids"] for b in batches])
    padding = torch.cat([b["text_padding_mask"] for b in batches])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for batch in batches:
        rows = order[start : start + len(batch["keys"])]
        out.append({**batch, "text_ids": ids[rows], "text_padding_mask": padding[rows]})
        start += len(rows)
    return out


def miou_by_kind(scored, batches: list[dict]) -> dict:
    """Val mIoU of attribute expressions and of relational ones ("the leftmost red one")."""
    texts = {f"{k}_{s}": t for b in batches for k, s, t in zip(b["keys"], b["sent_ids"], b["texts"])}
    ious: dict[str, list[float]] = {}
    for key, inter, union, *_ in scored.records():
        kind = "relational" if RELATION_WORDS & set(texts[key].split()) else "attribute"
        ious.setdefault(kind, []).append(inter / union if union else 1.0)
    return {kind: {"mIoU": round(sum(v) / len(v), 4), "n": len(v)} for kind, v in sorted(ious.items())}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo/quickstart"))
    parser.add_argument("--spatial", action="store_true", help="the synthetic set with relational expressions too")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()
    data_dir = args.out / ("synthetic-spatial" if args.spatial else "synthetic")
    run_dir = args.out / ("run-spatial" if args.spatial else "run")

    started = time.time()
    prepare_synthetic(data_dir, spatial=args.spatial)  # a finished set is kept; one made otherwise is an error
    prepared = time.time()

    recipe = load_recipe("tiny", args.overrides)
    if (run_dir / "last.pt").exists():
        (run_dir / "last.pt").unlink()  # always a fresh run
    last_print = [0.0]

    def progress(event: dict) -> None:
        if event["event"] == "val" or (event["event"] == "step" and time.time() - last_print[0] > 30):
            last_print[0] = time.time()
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in event.items()}, flush=True)

    cpu_before = cpu_seconds()
    summary = train(recipe, data_dir, run_dir, progress=progress)
    trained, train_cpu = time.time(), cpu_seconds() - cpu_before

    model = build_model(recipe)
    model.load_state_dict(load_checkpoint(run_dir / "last.pt")["model"])
    tokenizer = Tokenizer(data_dir / "spm.model", max_len=recipe.model.max_text_len)
    batches = list(build_eval_loader(data_dir, "val", recipe, tokenizer, num_workers=0))
    scored = evaluate_model(model, batches, threshold=recipe.model.threshold)
    normal = scored.summary()
    shuffled = evaluate_model(model, shuffled_expressions(batches), threshold=recipe.model.threshold).summary()
    result = {
        "val_mIoU": round(normal["mIoU"], 4), "val_oIoU": round(normal["oIoU"], 4),
        "shuffled_mIoU": round(shuffled["mIoU"], 4), "shuffled_oIoU": round(shuffled["oIoU"], 4),
        "ratio": round(normal["mIoU"] / max(shuffled["mIoU"], 1e-9), 2), "expressions": normal["n"],
        "steps": summary["step"], "prepare_s": round(prepared - started), "train_s": round(trained - prepared),
        "train_cpu_s": round(train_cpu),
        "eval_s": round(time.time() - trained), "threads": torch.get_num_threads(),
        "mIoU_by_kind": miou_by_kind(scored, batches),
    }  # fmt: skip
    print(json.dumps(result))
    ok = result["val_mIoU"] >= 0.6 and result["ratio"] >= 2 and result["train_s"] <= 600
    print("PASS" if ok else "FAIL", "(targets: val mIoU >= 0.6, >= 2x shuffled, training <= 600 s)")


if __name__ == "__main__":
    main()
