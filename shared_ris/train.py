"""Training, read top to bottom: set-up, data, model, optimizer, the loop with validation and
checkpoints, teardown (nanoGPT style; no trainer framework).

``train()`` is the door for the CLI and for Python: it checks the inputs, joins the process group
torchrun describes (or runs alone), builds the shard loaders and calls :func:`train_loop`, which
takes any :class:`DataSource`, so tests can drive it with in-memory batches. One optimizer step
(``train.accumulate_steps`` micro-batches, no host-device synchronisation) is
:func:`shared_ris.trainee.train_step`, the same one ``benchmarks/train_step.py`` times; the host
checks in with the device every ``train.log_every`` steps and at every epoch end (:func:`check_in`).

Run folder: see :mod:`shared_ris.run_folder`; checkpoints: :mod:`shared_ris.checkpoint`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch

from .checkpoint import load_checkpoint, load_tokenizer
from .config import Recipe
from .data import build_eval_loader, build_train_loader, read_manifest
from .data.loader import trainable_samples
from .data.location import DataLocation, data_location
from .data.manifest import split_info
from .data.streams import batched
from .distributed import DistEnv, setup, sum_across_ranks, teardown
from .errors import SharedRISError, first_line
from .evaluate import evaluate_model
from .optim import lr_at, set_lr
from .run_folder import RunFolder, check_folder_free
from .stop_signal import StopOnSignal
from .tokenizer import Tokenizer
from .train_state import RunState, set_rng_state
from .trainee import Trainee, build_trainee, train_step, wrap_for_training

Progress = Callable[[dict], None]
VAL_KEYS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n")
GENERALIZED_VAL_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc")


class TrainError(SharedRISError):
    """Training cannot start or go on; the message is one line naming the cause and the fix."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; ``last.pt`` holds the state just before that step."""

    @classmethod
    def at(cls, loss: float, state: RunState, saved: Path) -> "NonFiniteLossError":
        return cls(
            f"loss is {loss} at step {state.step + 1} (epoch {state.epoch}); saved {saved} at step {state.step}; "
            "lower train.lr or check the data, then --resume auto"
        )


class DataSource(Protocol):
    """What the loop needs from the data: per-rank (micro-)batches of equal count on every rank.

    An optimizer step takes ``train.accumulate_steps`` = k of them: an epoch has
    ``batches_per_epoch // k`` steps, and step s of an epoch starts at batch s·k."""

    batches_per_epoch: int

    def train_batches(self, epoch: int, start_batch: int) -> Iterable[dict]:
        """Batches ``start_batch`` … ``batches_per_epoch - 1`` of ``epoch``; a pure function of its arguments."""

    def val_batches(self) -> Iterable[dict] | None:
        """This rank's share of every validation expression, or None for no validation."""


class ShardData:
    """The prepared shards of ``data_dir`` through ``shared_ris.data``'s loaders."""

    def __init__(self, data_dir: str | Path, recipe: Recipe, tokenizer: Tokenizer, env: DistEnv) -> None:
        self.loader = build_train_loader(data_dir, recipe, tokenizer, rank=env.rank, world_size=env.world_size)
        self.batches_per_epoch = len(self.loader)
        self._val = lambda: build_eval_loader(
            data_dir, recipe.data.val_split, recipe, tokenizer, rank=env.rank, world_size=env.world_size
        )

    def train_batches(self, epoch: int, start_batch: int) -> Iterable[dict]:
        self.loader.set_epoch(epoch, start_batch)
        return self.loader

    def val_batches(self) -> Iterable[dict]:
        return self._val()


def default_tokenizer_path(location: DataLocation) -> Path | None:
    """The synthetic set ships its own ``spm.model``; real data needs ``--tokenizer beit3.spm``."""
    candidate = Path(location.text) / "spm.model"
    return candidate if location.is_local and candidate.is_file() else None  # remote data: pass --tokenizer


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
    location = data_location(data_dir)
    manifest = read_manifest(location)
    split_info(manifest, recipe.data.val_split, location)
    samples = trainable_samples(split_info(manifest, recipe.data.train_split, location), recipe.data.text_field, location)
    cfg = recipe.train
    if samples < cfg.batch_size * world_size * cfg.accumulate_steps:
        raise TrainError(
            f"the '{recipe.data.train_split}' split has {samples} samples to learn from, fewer than one optimizer step of "
            f"train.batch_size={cfg.batch_size} × {world_size} process(es) × train.accumulate_steps={cfg.accumulate_steps}; "
            "lower train.batch_size or train.accumulate_steps"
        )
    tokenizer_path = tokenizer_path or default_tokenizer_path(location)
    if tokenizer_path is None:
        raise TrainError(f"no tokenizer: pass --tokenizer beit3.spm ({data_dir} has no spm.model)")
    tokenizer = load_tokenizer(tokenizer_path, recipe)
    if pretrained is not None and not Path(pretrained).is_file():
        raise TrainError(f"{pretrained}: pretrained file not found; download beit3_base_patch16_224.pth from the BEiT-3 README")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise TrainError(f"{resume}: no checkpoint to resume from; pass --resume auto or a path to last.pt")
    if out_dir is not None:
        _check_out_dir(Path(out_dir), resume)
    return tokenizer


def _check_out_dir(out_dir: Path, resume) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir}: exists and is not a folder; choose another --out")
    if resume is None and (out_dir / "last.pt").is_file():
        raise TrainError(f"{out_dir} already holds a run (last.pt); pass --resume auto to continue it or choose another --out")
    check_folder_free(out_dir)


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
            out_dir=out_dir if env.is_main else None,  # rank 0 alone checks (and then locks) the run folder
        )
        data = ShardData(data_dir, recipe, tokenizer, env)
        return train_loop(
            recipe, data, out_dir, env=env, pretrained=pretrained, resume=resume, progress=progress,
            tokenizer_path=str(tokenizer.path), dataset=dataset_name(data_dir),
        )
    finally:
        teardown(env)


def dataset_name(data_dir: str | Path) -> str | None:
    """The manifest's ``dataset`` (``synthetic``, ``refcoco``, …), which checkpoints record."""
    name = read_manifest(data_location(data_dir)).get("dataset")
    return name if isinstance(name, str) and name else None


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


def resume_from(path: Path, trainee: Trainee, recipe: Recipe, env: DistEnv, notify: Progress) -> RunState:
    """Weights, optimizer, counters, best score and this rank's RNG from a checkpoint."""
    checkpoint = load_checkpoint(path)
    try:
        trainee.model.load_state_dict(checkpoint["model"])
        trainee.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError) as exc:
        raise TrainError(f"{path} does not fit this recipe's model ({first_line(exc, 160)}); resume with the recipe it was saved with") from None
    trainee.scaler.load_state_dict(checkpoint["scaler"])
    state = RunState.from_checkpoint(checkpoint)
    message = f"resumed from {path} at step {state.step}"
    if len(checkpoint["rng"]) == env.world_size:
        set_rng_state(checkpoint["rng"][env.rank])
    else:
        message += f"; saved by {len(checkpoint['rng'])} processes, so drop path will not repeat exactly"
    changed = _changed_keys(checkpoint["recipe"], recipe.to_dict())
    notify({"event": "message", "text": message + (f"; recipe keys changed: {', '.join(changed)}" if changed else "")})
    return state


def validate(trainee: Trainee, batches: Iterable[dict], recipe: Recipe) -> dict:
    """Score every val expression with ``sris eval``'s default protocol → {oIoU, mIoU, P@X, n}, and
    gIoU, cIoU, N-acc, T-acc when some expression names no object or several (generalized RIS)."""
    acc = evaluate_model(
        trainee.model, batches, threshold=recipe.model.threshold, resolution="original", device=trainee.device, amp=trainee.amp,
        resize=recipe.data.resize,
    )
    summary = acc.summary(generalized=any(count != 1 for count in acc.target_counts))
    generalized = summary.get("generalized", {}).get("all", {})
    return {k: summary[k] for k in VAL_KEYS} | {k: generalized[k] for k in GENERALIZED_VAL_KEYS if k in generalized}


def validate_and_save(run: RunFolder, trainee: Trainee, data: DataSource, recipe: Recipe, state: RunState, notify: Progress) -> dict | None:
    """Validate (when ``data`` has a val split), log the figures, save ``last.pt`` and, on a new best
    oIoU, ``best.pt``. Returns the figures or None."""
    batches = data.val_batches()
    figures = None
    if batches is not None:
        notify({"event": "val_start", "step": state.step})
        figures = validate(trainee, batches, recipe)
        run.log({"epoch": state.epoch, "step": state.step, "split": recipe.data.val_split, **figures})
        notify({"event": "val", "epoch": state.epoch, "step": state.step, **figures})
    improved = figures is not None and state.record_val(figures["oIoU"])
    run.save(["last.pt", "best.pt"] if improved else ["last.pt"], trainee.state_dicts(), state)
    return figures


class Throughput:
    """Global images/s between log lines."""

    def __init__(self, images_per_step: int, step: int) -> None:
        self.images_per_step = images_per_step
        self.reset(step)

    def reset(self, step: int) -> None:
        self.tick, self.step = time.perf_counter(), step

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.images_per_step * (step - self.step) / max(now - self.tick, 1e-9)
        self.tick, self.step = now, step
        return rate


def total_train_steps(cfg, steps_per_epoch: int) -> int:
    if steps_per_epoch < 1:
        raise TrainError(
            "the training split yields no optimizer step per process; lower train.batch_size, train.accumulate_steps "
            "or use fewer processes"
        )
    total = cfg.epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def check_in(run: RunFolder, trainee: Trainee, state: RunState, losses: torch.Tensor, env: DistEnv, stop_requested: bool) -> tuple[dict, bool]:
    """The host's look at the device: the one synchronisation outside validation and saving.

    A non-finite loss since the last check-in stops the run: the guard has undone every step from
    it on, so the model is as after the step before it, which is saved to ``last.pt`` (with the
    counters of that step) before :class:`NonFiniteLossError` names the step. Otherwise returns
    this step's global losses and whether any rank was asked to stop (all ranks agree)."""
    verdict = trainee.guard.verdict()
    if verdict is not None:
        first_bad, loss = verdict
        done = state.step - first_bad + 1  # steps undone; check-ins at every epoch end keep them in this epoch
        before = RunState(first_bad - 1, state.epoch, state.epoch_step - done, state.best_oiou)
        run.save(["last.pt"], trainee.state_dicts(), before)
        raise NonFiniteLossError.at(loss, before, run.path / "last.pt")
    values = dict(zip(trainee.loss_keys, losses.tolist()))
    stop_votes = sum_across_ranks([float(stop_requested)], env)[0]
    return values, stop_votes > 0


def train_loop(
    recipe: Recipe, data: DataSource, out_dir: str | Path, *, env: DistEnv = DistEnv(), pretrained: str | Path | None = None,
    resume: str | Path | None = None, progress: Progress | None = None, tokenizer_path: str | None = None, dataset: str | None = None,
) -> dict:
    """The training loop. Every rank calls it with its own ``data``; rank 0 writes the run folder.

    Returns {"step", "epoch", "best_oiou", "val", "stopped", "out_dir", "wall_s"}; raises
    :class:`NonFiniteLossError` (after saving ``last.pt``) when the loss is not finite.
    """
    cfg, k, started = recipe.train, recipe.train.accumulate_steps, time.time()
    if env.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal activations and Adam moments made CPU steps up to 100× slower
    notify = progress if (progress is not None and env.is_main) else (lambda event: None)
    with RunFolder(out_dir, recipe, env, tokenizer_path, dataset) as run, StopOnSignal() as stop:
        checkpoint_path = run.resume_path(resume)
        trainee = build_trainee(recipe, env, pretrained if checkpoint_path is None else None, notify)
        steps_per_epoch = data.batches_per_epoch // k
        total_steps = total_train_steps(cfg, steps_per_epoch)
        torch.manual_seed(cfg.seed + env.rank)  # drop path differs across ranks, repeatably
        state = resume_from(checkpoint_path, trainee, recipe, env, notify) if checkpoint_path else RunState()
        run.open_log(state.step if checkpoint_path else None)
        wrap_for_training(trainee, recipe, env)
        notify({"event": "start", "step": state.step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "world_size": env.world_size})

        trainee.model.train()
        stopped, val, val_step = False, None, -1
        meter = Throughput(cfg.batch_size * env.world_size * k, state.step)
        while state.step < total_steps and not stopped:
            for micro_batches in batched(rng_neutral(data.train_batches(state.epoch, state.epoch_step * k)), k):
                if len(micro_batches) < k or state.epoch_step >= steps_per_epoch:
                    break  # only whole optimizer steps; the epoch's remainder is dropped
                lr = lr_at(state.step, total_steps, cfg)
                set_lr(trainee.optimizer, lr)
                losses = train_step(trainee, micro_batches, recipe, env, step=state.step + 1)
                state.advance()
                record = {"step": state.step, "epoch": state.epoch, "lr": lr}
                if state.step % cfg.log_every == 0 or state.step == total_steps or state.epoch_step == steps_per_epoch:
                    values, stopped = check_in(run, trainee, state, losses, env, stop.requested)
                    record = {"step": state.step, "epoch": state.epoch, **values, "lr": lr, "img_s": meter.rate(state.step)}
                    run.log(record)
                notify({"event": "step", **record, "total_steps": total_steps})
                if stopped or state.step >= total_steps:
                    break
            if stopped:
                run.save(["last.pt"], trainee.state_dicts(), state)
                break
            if state.epoch_step >= steps_per_epoch:  # an epoch is complete: continue from the next one
                state.next_epoch()
                if state.epoch % cfg.eval_every == 0 or state.step >= total_steps:
                    val, val_step = validate_and_save(run, trainee, data, recipe, state, notify), state.step
                else:
                    run.save(["last.pt"], trainee.state_dicts(), state)
                meter.reset(state.step)
        if not stopped and val_step != state.step:  # max_steps ended mid-epoch: score the final weights too
            val = validate_and_save(run, trainee, data, recipe, state, notify)
    summary = {
        "step": state.step, "epoch": state.epoch, "best_oiou": state.best_oiou, "val": val, "stopped": stopped,
        "out_dir": str(Path(out_dir)), "wall_s": time.time() - started,
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
