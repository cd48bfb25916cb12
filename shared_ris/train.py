"""Training, read top to bottom: set-up, data, model, optimizer, the loop with validation and
checkpoints, teardown (nanoGPT style; no trainer framework).

``train()`` is the door for the CLI and for Python: it checks the inputs, joins the process group
torchrun describes (or runs alone), builds the shard loaders and calls :func:`train_loop`, which
takes any :class:`DataSource`, so tests can drive it with in-memory batches.

Run folder: ``recipe.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object per log line),
``last.pt`` and ``best.pt`` (best validation oIoU); see :mod:`shared_ris.train_state`.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from .config import Recipe
from .data import build_eval_loader, build_train_loader, read_manifest
from .data.manifest import is_remote, split_info
from .distributed import DistEnv, gather_objects, setup, sum_across_ranks, teardown
from .errors import SharedRISError
from .evaluate import autocast
from .evaluate import evaluate_model
from .layers.sync_batchnorm import convert_sync_batchnorm
from .model import build_model, segmentation_loss
from .optim import build_optimizer, lr_at, set_lr
from .tokenizer import Tokenizer
from .train_state import load_checkpoint, rng_state, save_checkpoint, set_rng_state

Progress = Callable[[dict], None]
VAL_KEYS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n")


class TrainError(SharedRISError):
    """Training cannot start or go on; the message is one line naming the cause and the fix."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; ``last.pt`` holds the state just before that step."""


class DataSource(Protocol):
    """What the loop needs from the data: per-rank batches of equal count on every rank."""

    steps_per_epoch: int

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict]:
        """Batches ``start_step`` … ``steps_per_epoch - 1`` of ``epoch``; a pure function of its arguments."""

    def val_batches(self) -> Iterable[dict] | None:
        """This rank's share of every validation expression, or None for no validation."""


class ShardData:
    """The prepared shards of ``data_dir`` through ``shared_ris.data``'s loaders."""

    def __init__(self, data_dir: str | Path, recipe: Recipe, tokenizer: Tokenizer, env: DistEnv) -> None:
        self.loader = build_train_loader(data_dir, recipe, tokenizer, rank=env.rank, world_size=env.world_size)
        self.steps_per_epoch = len(self.loader)
        self._val = lambda: build_eval_loader(
            data_dir, recipe.data.val_split, recipe, tokenizer, rank=env.rank, world_size=env.world_size
        )

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict]:
        self.loader.set_epoch(epoch, start_step)
        return self.loader

    def val_batches(self) -> Iterable[dict]:
        return self._val()


def default_tokenizer_path(data_dir: str | Path) -> Path | None:
    """The synthetic set ships its own ``spm.model``; real data needs ``--tokenizer beit3.spm``."""
    candidate = Path(data_dir) / "spm.model"
    return candidate if candidate.is_file() else None  # remote data: pass --tokenizer


def preflight(
    recipe: Recipe,
    data_dir: str | Path,
    *,
    pretrained: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    resume: str | Path | None = None,
    world_size: int = 1,
    out_dir: str | Path | None = None,
) -> Tokenizer:
    """Every check that can fail before work starts, each a one-line :class:`SharedRISError`.

    Returns the tokenizer. The CLI calls it before launching torchrun, so a bad path fails once.
    """
    if not is_remote(data_dir) and not Path(data_dir).is_dir():
        raise TrainError(f"{data_dir}: data directory not found; run `sris prepare` first and pass its output as --data")
    manifest = read_manifest(data_dir)
    split_info(manifest, recipe.data.val_split, data_dir)
    samples = split_info(manifest, recipe.data.train_split, data_dir)["samples"]
    if samples < recipe.train.batch_size * world_size:
        raise TrainError(
            f"the '{recipe.data.train_split}' split has {samples} samples, fewer than one batch of "
            f"train.batch_size={recipe.train.batch_size} × {world_size} process(es); lower train.batch_size"
        )
    tokenizer_path = tokenizer_path or default_tokenizer_path(data_dir)
    if tokenizer_path is None:
        raise TrainError(f"no tokenizer: pass --tokenizer beit3.spm ({data_dir} has no spm.model)")
    tokenizer = Tokenizer(tokenizer_path, max_len=recipe.model.max_text_len)
    if tokenizer.vocab_size > recipe.model.encoder.vocab_size:
        raise TrainError(
            f"{tokenizer_path} has {tokenizer.vocab_size} ids but model.encoder.vocab_size is "
            f"{recipe.model.encoder.vocab_size}; use the matching tokenizer or raise model.encoder.vocab_size"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise TrainError(f"{pretrained}: pretrained file not found; download beit3_base_patch16_224.pth from the BEiT-3 README")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise TrainError(f"{resume}: no checkpoint to resume from; pass --resume auto or a path to last.pt")
    if resume is None and out_dir is not None and (Path(out_dir) / "last.pt").is_file():
        raise TrainError(f"{out_dir} already holds a run (last.pt); pass --resume auto to continue it or choose another --out")
    return tokenizer


def train(
    recipe: Recipe,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    pretrained: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train ``recipe`` on the prepared shards in ``data_dir``, writing the run to ``out_dir``.

    Under torchrun every process calls this; alone it runs in place. ``resume`` is ``"auto"``
    (continue from ``out_dir/last.pt`` when present) or a checkpoint path. ``progress(event)`` is
    called on rank 0 only. Returns the summary of :func:`train_loop`.
    """
    env = setup(device)
    try:
        tokenizer = preflight(
            recipe, data_dir, pretrained=pretrained, tokenizer_path=tokenizer_path, resume=resume, world_size=env.world_size,
            out_dir=out_dir,
        )
        data = ShardData(data_dir, recipe, tokenizer, env)
        return train_loop(
            recipe, data, out_dir, env=env, pretrained=pretrained, resume=resume, progress=progress,
            tokenizer_path=str(tokenizer.path),
        )
    finally:
        teardown(env)


class StopOnSignal:
    """SIGTERM / SIGINT set ``requested``; the loop finishes its step, saves and returns.

    A signal arriving more than ``patience`` seconds after the first stops at once
    (KeyboardInterrupt): an impatient second Ctrl-C. Copies of the first that arrive together
    (the terminal, torchrun and SLURM may each deliver one) only repeat the request.
    Handlers are only installed from the main thread.
    """

    def __init__(self, patience: float = 5.0) -> None:
        self.requested = False
        self.patience = patience
        self._first = 0.0
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested and time.monotonic() - self._first > self.patience:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, time.monotonic()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """Append JSON lines to ``metrics.jsonl`` (rank 0 only). On resume, lines past the resumed step
    (written after the checkpoint by a run that then died) are dropped, so the log stays one history."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resumed_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def rng_neutral(batches: Iterable[dict]) -> Iterator[dict]:
    """Yield ``batches`` without letting them touch the global torch RNG.

    A DataLoader draws its base seed from it when it starts, so a resumed run, which starts its
    loader mid-epoch, would shift drop path's random stream; shielded, that stream depends on the
    step alone.
    """
    with torch.random.fork_rng(devices=[]):
        iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def resolve_resume(resume: str | Path | None, out_dir: Path) -> Path | None:
    if resume == "auto":
        last = out_dir / "last.pt"
        return last if last.is_file() else None
    return Path(resume) if resume is not None else None


def train_loop(
    recipe: Recipe,
    data: DataSource,
    out_dir: str | Path,
    *,
    env: DistEnv = DistEnv(),
    pretrained: str | Path | None = None,
    resume: str | Path | None = None,
    progress: Progress | None = None,
    tokenizer_path: str | None = None,
) -> dict:
    """The training loop. Every rank calls it with its own ``data``; rank 0 writes the run folder.

    Returns {"step", "epoch", "best_oiou", "val", "stopped", "out_dir", "wall_s"}; raises
    :class:`NonFiniteLossError` (after saving ``last.pt``) when the loss is not finite.
    """
    cfg, device, started = recipe.train, env.device, time.time()
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal activations and Adam moments made CPU steps up to 100× slower
    out_dir = Path(out_dir)
    notify = progress if (progress is not None and env.is_main) else (lambda event: None)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(recipe.to_yaml())

    # model: the same initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
    torch.manual_seed(cfg.seed)
    model = build_model(recipe)
    checkpoint_path = resolve_resume(resume, out_dir)
    if pretrained is not None and checkpoint_path is None:
        notify({"event": "message", "text": model.load_pretrained(pretrained, verbose=False).summary()})
    if env.distributed and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    amp = cfg.amp if device.type == "cuda" else "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    steps_per_epoch = data.steps_per_epoch
    if steps_per_epoch < 1:
        raise TrainError("the training split yields no batch per process; lower train.batch_size or use fewer processes")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    # resume: weights, optimizer, step, best score and this rank's RNG; the data order follows (epoch, epoch_step)
    step, epoch, epoch_step, best_oiou = 0, 0, 0, -1.0
    torch.manual_seed(cfg.seed + env.rank)  # drop path differs across ranks, repeatably
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise TrainError(f"{checkpoint_path} does not fit this recipe's model ({first}); resume with the recipe it was saved with") from None
        scaler.load_state_dict(state["scaler"])
        step, epoch, epoch_step, best_oiou = state["step"], state["epoch"], state["epoch_step"], state["best_oiou"]
        message = f"resumed from {checkpoint_path} at step {step}"
        if len(state["rng"]) == env.world_size:
            set_rng_state(state["rng"][env.rank])
        else:
            message += f"; saved by {len(state['rng'])} processes, so drop path will not repeat exactly"
        changed = _changed_keys(state["recipe"], recipe.to_dict())
        notify({"event": "message", "text": message + (f"; recipe keys changed: {', '.join(changed)}" if changed else "")})
    log = MetricsLog(out_dir / "metrics.jsonl", env.is_main, step if checkpoint_path is not None else None)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if env.distributed else model

    def checkpoint(*names: str) -> None:
        rngs = gather_objects(rng_state(), env)  # a collective: every rank calls it
        if env.is_main:
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "epoch_step": epoch_step, "step": step, "best_oiou": best_oiou,
                "rng": rngs, "recipe": recipe.to_dict(), "tokenizer_path": tokenizer_path,
            }  # fmt: skip
            for name in names:
                save_checkpoint(state, out_dir / name)

    last_val: dict | None = None
    val_step = -1

    def validate() -> bool:
        """Score every val expression; True when oIoU is a new best."""
        nonlocal best_oiou, last_val, val_step
        batches = data.val_batches()
        if batches is None:
            return False
        notify({"event": "val_start", "step": step})
        summary = evaluate_model(model, batches, threshold=recipe.model.threshold, resolution="original", device=device, amp=amp)
        last_val = {k: summary.summary()[k] for k in VAL_KEYS}
        val_step = step
        log.write({"epoch": epoch, "step": step, "split": recipe.data.val_split, **last_val})
        notify({"event": "val", "epoch": epoch, "step": step, **last_val})
        improved = last_val["oIoU"] > best_oiou
        best_oiou = max(best_oiou, last_val["oIoU"])
        return improved

    notify({
        "event": "start", "step": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "world_size": env.world_size,
    })  # fmt: skip
    model.train()
    stopped = False
    images_per_step = cfg.batch_size * env.world_size
    tick, ticked_step = time.perf_counter(), step
    with StopOnSignal() as stop:
        while step < total_steps and not stopped:
            for batch in rng_neutral(data.train_batches(epoch, epoch_step)):
                lr = lr_at(step, total_steps, cfg)
                set_lr(optimizer, lr)
                with autocast(device, amp):
                    logits = ddp(
                        batch["images"].to(device, non_blocking=True),
                        batch["text_ids"].to(device, non_blocking=True),
                        batch["text_padding_mask"].to(device, non_blocking=True),
                    )
                losses = segmentation_loss(logits, batch["masks"].to(device), recipe.loss.bce_weight, recipe.loss.dice_weight)
                # one collective per step: the global mean losses and whether any rank was asked to stop
                loss_sum, bce_sum, dice_sum, stop_votes = sum_across_ranks(
                    [losses["loss"].item(), losses["bce"].item(), losses["dice"].item(), float(stop.requested)], env
                )
                if not math.isfinite(loss_sum):
                    checkpoint("last.pt")
                    raise NonFiniteLossError(
                        f"loss is {loss_sum / env.world_size} at step {step + 1} (epoch {epoch}); saved {out_dir / 'last.pt'} "
                        f"at step {step}; lower train.lr or check the data, then --resume auto"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step, epoch_step = step + 1, epoch_step + 1

                record = {
                    "step": step, "epoch": epoch, "loss": loss_sum / env.world_size, "bce": bce_sum / env.world_size,
                    "dice": dice_sum / env.world_size, "lr": lr,
                }  # fmt: skip
                stopped = stop_votes > 0
                if step % cfg.log_every == 0 or step == total_steps or stopped:
                    now = time.perf_counter()
                    record["img_s"] = images_per_step * (step - ticked_step) / max(now - tick, 1e-9)
                    tick, ticked_step = now, step
                    log.write(record)
                notify({"event": "step", **record, "total_steps": total_steps})
                if stopped or step >= total_steps:
                    break
            if stopped:
                checkpoint("last.pt")
                break
            if epoch_step >= steps_per_epoch:  # an epoch is complete: continue from the next one
                epoch, epoch_step = epoch + 1, 0
                if epoch % cfg.eval_every == 0 or step >= total_steps:
                    improved = validate()
                    checkpoint("last.pt", *(["best.pt"] if improved else []))
                else:
                    checkpoint("last.pt")
                tick, ticked_step = time.perf_counter(), step

        if not stopped and val_step != step:  # max_steps ended mid-epoch: score the final weights too
            improved = validate()
            checkpoint("last.pt", *(["best.pt"] if improved else []))
    summary = {
        "step": step, "epoch": epoch, "best_oiou": best_oiou, "val": last_val, "stopped": stopped,
        "out_dir": str(out_dir), "wall_s": time.time() - started,
    }  # fmt: skip
    notify({"event": "end", **summary})
    return summary


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
