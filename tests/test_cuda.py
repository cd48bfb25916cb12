"""On a CUDA GPU: bf16 against fp32, optimizer steps with compile and checkpointing on and off,
evaluation and prediction against the CPU, and a step that never synchronises with the host.

Run with ``pytest -m cuda`` (``benchmarks/gpu_check.sh`` does); skipped where there is no GPU.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fixtures_predict import make_trained_run
from shared_ris import load_recipe
from shared_ris.checkpoint import load_run
from shared_ris.data import build_eval_loader, prepare_synthetic
from shared_ris.distributed import DistEnv
from shared_ris.evaluate import evaluate_model
from shared_ris.flops import dummy_batch
from shared_ris.predictor import Predictor
from shared_ris.trainee import build_trainee, train_step, wrap_for_training

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_bf16_forward_is_close_to_fp32(name):
    recipe = load_recipe(name)
    trainee = build_trainee(recipe, DistEnv(device=CUDA))
    model = trainee.model.eval()
    batch = dummy_batch(recipe, 2, CUDA)
    inputs = (batch["images"], batch["text_ids"], batch["text_padding_mask"])
    with torch.no_grad():
        fp32 = model(*inputs).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(*inputs).float()
    assert torch.isfinite(bf16).all()
    cosine = torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)
    assert (fp32 - bf16).abs().max() < 0.1 * fp32.std() + 1e-3


STEP_CASES = [("tiny", c, k) for c in (False, True) for k in (False, True)] + [("base", False, False), ("base", False, True), ("base", True, False)]


@pytest.mark.parametrize("name,compile_,checkpointing", STEP_CASES)  # base compiled once: compiling it takes a minute
def test_optimizer_steps(name, compile_, checkpointing):
    recipe = load_recipe(name, [f"train.compile={str(compile_).lower()}", f"train.activation_checkpointing={str(checkpointing).lower()}",
                                "train.batch_size=2", "train.accumulate_steps=2"])  # fmt: skip
    env = DistEnv(device=CUDA)
    trainee = build_trainee(recipe, env)
    wrap_for_training(trainee, recipe, env)
    trainee.model.train()
    before = {n: p.detach().clone() for n, p in trainee.model.named_parameters() if p.requires_grad}
    for step in range(1, 4):
        losses = train_step(trainee, [dummy_batch(recipe, 2, CUDA, seed=2 * step + i) for i in range(2)], recipe, env, step=step)
        assert torch.isfinite(losses).all()
    assert trainee.guard.verdict() is None
    changed = sum(not torch.equal(before[n], p) for n, p in trainee.model.named_parameters() if p.requires_grad)
    assert changed > 0.9 * len(before)


def test_a_steady_state_step_does_not_synchronise():
    recipe = load_recipe("tiny", ["train.batch_size=4"])
    env = DistEnv(device=CUDA)
    trainee = build_trainee(recipe, env)
    trainee.model.train()
    batches = [dummy_batch(recipe, 4, CUDA, seed=s) for s in range(3)]
    train_step(trainee, [batches[0]], recipe, env, step=1)  # the first step allocates optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, batch in enumerate(batches[1:], 2):
            train_step(trainee, [batch], recipe, env, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    prepare_synthetic(root / "data", train=0, val=40, test=0, size=128, workers=2)
    return root / "data", make_trained_run(root / "run")


def test_eval_on_cuda_equals_eval_on_cpu_up_to_threshold_flips(synthetic_run):
    data, checkpoint = synthetic_run
    records = {}
    for device in ("cpu", "cuda"):
        model, recipe, tokenizer = load_run(checkpoint, device=device, data_dir=data)
        loader = build_eval_loader(data, "val", recipe, tokenizer, num_workers=0)
        records[device] = evaluate_model(model, loader, recipe.model.threshold, device=device, amp="fp32").records()
    assert [r[0] for r in records["cpu"]] == [r[0] for r in records["cuda"]]
    for (key, inter_a, union_a, *_), (_, inter_b, union_b, *_) in zip(records["cpu"], records["cuda"]):
        assert abs(inter_a - inter_b) <= max(3, 0.01 * union_a) and abs(union_a - union_b) <= max(3, 0.01 * union_a), key


def test_predict_on_cuda_matches_the_cpu(synthetic_run):
    _, checkpoint = synthetic_run
    image = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(0))
    picture = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    masks = {}
    for device in ("cpu", "cuda"):
        [prediction] = Predictor.from_checkpoint(checkpoint, device=device).predict([picture], "the red circle", attention=True)
        masks[device] = prediction.mask
        assert set(prediction.attention) == {"encoder", "fpn", "decoder"}
    disagree = (masks["cpu"] != masks["cuda"]).sum()
    assert disagree <= 0.01 * masks["cpu"].size
