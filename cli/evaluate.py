"""``sris eval``: oIoU, mIoU, P@X and IoU by target size of a trained checkpoint, under a stated protocol."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared_ris.data.location import data_location
from shared_ris.distributed import check_gpus, is_main_process, under_torchrun
from shared_ris.fileio import check_output_file, check_output_folder
from shared_ris.model import NoTargetRule
from shared_ris.evaluate import PROTOCOLS, RESOLUTIONS, check_eval_inputs, evaluate_run, parse_splits, resolve_protocol
from shared_ris.visualize import plot_iou_by_size

from .common import AllowPipeOption, DataOption, console, fail, user_errors, write_json
from .launch import relaunch

Resolution = Enum("Resolution", {name: name for name in RESOLUTIONS}, type=str)
Comparison = Enum("Comparison", {"strict": "strict", "inclusive": "inclusive"}, type=str)
Preset = Enum("Preset", {name: name for name in PROTOCOLS}, type=str)
EmptyIoU = Enum("EmptyIoU", {"one": "1", "zero": "0"}, type=str)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def render_split(split: str, figures: dict, protocol_line: str) -> None:
    """The metrics table and the by-size table of one split, each with the protocol under it."""
    table = Table(title=f"{split}")
    for column in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9"):
        table.add_column(f"{column} (%)", justify="right")
    table.add_column("expressions", justify="right")
    table.add_row(*(_percent(figures[k]) for k in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")), str(figures["n"]))
    console.print(table)
    console.print(protocol_line, style="dim", highlight=False, soft_wrap=True)
    sizes = Table(title=f"{split}: IoU by target size (target area / image area)")
    for column in ("target size", "expressions", "mIoU (%)", "oIoU (%)"):
        sizes.add_column(column, justify="right")
    for row in figures["by_size"]:
        filled = row["n"] > 0
        sizes.add_row(
            f"{row['lo'] * 100:g}–{row['hi'] * 100:g}%", str(row["n"]),
            _percent(row["mIoU"]) if filled else "-", _percent(row["oIoU"]) if filled else "-",
        )  # fmt: skip
    console.print(sizes)
    console.print(protocol_line, style="dim", highlight=False, soft_wrap=True)


GENERALIZED_COLUMNS = ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9")


def render_generalized(split: str, figures: dict, rule: str) -> None:
    """gRefCOCO's figures (ReLA's evaluator) over all expressions and by target count."""
    table = Table(title=f"{split}: generalized (gRefCOCO) figures")
    table.add_column("targets", no_wrap=True)
    for column in GENERALIZED_COLUMNS:
        table.add_column(f"{column} (%)", justify="right")
    table.add_column("n", justify="right")
    for group, row in figures.items():
        cells = ("-" if row[k] != row[k] else _percent(row[k]) for k in GENERALIZED_COLUMNS)  # nan: no expression of that kind
        table.add_row(group, *cells, str(row["n"]))
    console.print(table)
    console.print(f"by target count (all, 0 = no target, 1, 2+); no-target decision: {rule}; N-acc over no-target expressions, T-acc and Pr@X over the others", style="dim", highlight=False, soft_wrap=True)


def _check_options(gpus: int, nproc: int, workers: int | None, batch_size: int | None) -> None:
    if gpus < 1 or nproc < 1:
        fail(f"--gpus and --nproc count processes: give 1 or more, got {gpus if gpus < 1 else nproc}")
    if gpus > 1 and nproc > 1:
        fail("give --gpus N (GPUs) or --nproc N (CPU processes), not both")
    if workers is not None and workers < 0:
        fail(f"--workers must be 0 (read in the main process) or more, got {workers}")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")


@user_errors
def evaluate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A trained run's best.pt or last.pt."),
    data: str = DataOption,
    allow_pipe: bool = AllowPipeOption,
    split: str = typer.Option("val", "--split", "-s", help="Split(s) to score, comma-separated, e.g. val,testA,testB."),
    protocol: Preset = typer.Option(
        "default", "--protocol",
        help="Preset: default = original size, σ > recipe τ, P@X with IoU > X, both masks empty = IoU 1 (what training's "
        "validation reports); lavt = 480² input size (ground truth resized with PIL nearest, as LAVT), σ > 0.5 (LAVT's argmax), "
        "P@X with IoU ≥ X, both empty = IoU 0; cris = original size through CRIS's bicubic resampling (σ, bicubic to the input, "
        "inverse warp), σ > 0.35, IoU > X, both empty = IoU 0. --resolution / --threshold / --precision / --empty-iou override single choices.",
    ),
    resolution: Optional[Resolution] = typer.Option(None, "--resolution", help="Score masks at the image's original size or at the model's input size."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="τ on the probability map (default: the recipe's, 0.35)."),
    precision: Optional[Comparison] = typer.Option(None, "--precision", help="P@X counts IoU > X (strict) or IoU ≥ X (inclusive)."),
    empty_iou: Optional[EmptyIoU] = typer.Option(None, "--empty-iou", help="IoU of an expression whose prediction and ground truth are both empty: 1 or 0 (LAVT)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Sentencepiece model (default: DATA/spm.model, else the one beside the checkpoint)."),
    gpus: int = typer.Option(1, "--gpus", help="Evaluate on N GPUs (NCCL); the figures equal a single process's exactly."),
    nproc: int = typer.Option(1, "--nproc", help="Evaluate on N CPU processes (gloo); for testing multi-process evaluation."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Expressions per batch (default: the loader's)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader workers (default: the recipe's)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures (IoUs as fractions) to this JSON file."),
    save_masks: Optional[Path] = typer.Option(
        None, "--save-masks",
        help="Write the scored masks, DIR/{split}/{key}_{sent_id}.png, and the ground truth they were scored against, "
        "DIR/{split}/gt/{key}.png (0/255, at the scoring resolution: the image's size, or S×S under --resolution input).",
    ),  # fmt: skip
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw mIoU by target size as a bar chart (PNG)."),
    no_target_area: Optional[int] = typer.Option(
        None, "--no-target-area", min=0,
        help="Decide 'names nothing' by the area rule: a mask under this many pixels at the input size (0: never), "
        "instead of the model's own rule (its no-target head, or the recipe's model.no_target_min_area).",
    ),
    no_target_threshold: Optional[float] = typer.Option(
        None, "--no-target-threshold",
        help="Decide 'names nothing' by the no-target head's σ > P instead of the recipe's model.no_target_threshold "
        "(0.5): lower finds more no-target expressions (N-acc) and wrongly empties more others (T-acc). Choose it on val.",
    ),  # fmt: skip
) -> None:
    """Score a trained checkpoint on prepared splits: oIoU, mIoU, P@0.5/0.7/0.9 and IoU by target size."""
    chosen = resolve_protocol(
        protocol.value,
        resolution=resolution.value if resolution else None,
        threshold=threshold,
        inclusive=None if precision is None else precision.value == "inclusive",
        empty_iou=None if empty_iou is None else float(empty_iou.value),
    )
    splits = parse_splits(split)
    _check_options(gpus, nproc, workers, batch_size)
    rule = _rule_from_options(no_target_area, no_target_threshold)
    for path, option in ((json_path, "--json"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)
    if save_masks is not None:
        check_output_folder(save_masks, "--save-masks")
    location = data_location(data, allow_pipe=allow_pipe)
    processes = max(gpus, nproc)
    if processes > 1 and not under_torchrun():  # the launcher: check once, then run N copies of this command
        if gpus > 1:
            check_gpus(gpus)
        check_eval_inputs(checkpoint, location, splits, tokenizer=tokenizer)
        relaunch(ctx, processes, device="cuda" if gpus > 1 else device or "cpu")

    is_main = is_main_process()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not is_main) as bar:
        tasks: dict[str, TaskID] = {}

        def advance(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"{name}: expressions", total=total)
            bar.update(tasks[name], completed=done)

        report = evaluate_run(
            checkpoint, location, splits, tokenizer=tokenizer, protocol=chosen, save_masks=save_masks, device=device,
            batch_size=batch_size, num_workers=workers, progress=advance,
            no_target=rule,
        )  # fmt: skip
    if is_main:
        _print_report(report, json_path, save_masks, plot)


def _rule_from_options(area: int | None, threshold: float | None) -> NoTargetRule | None:
    """The rule the options ask for, or None for the model's own."""
    if area is not None and threshold is not None:
        fail("give --no-target-area K (the area rule) or --no-target-threshold P (the head), not both")
    if threshold is not None and not 0.0 < threshold < 1.0:
        fail(f"--no-target-threshold is a probability in (0, 1), got {threshold}")
    if threshold is not None:
        return NoTargetRule(head=True, head_threshold=threshold)
    return None if area is None else NoTargetRule(head=False, min_area=area)


def _print_report(report: dict, json_path: Path | None, save_masks: Path | None, plot: Path | None) -> None:
    line = report["protocol"]["description"]
    for name, figures in report["splits"].items():
        render_split(name, figures, line)
        if "generalized" in figures:
            render_generalized(name, figures["generalized"], report["no_target_rule"])
    if json_path is not None:
        write_json(json_path, report)
    if save_masks is not None:
        console.print(f"scored masks in {save_masks}/{{split}}/, the ground truth they were scored against in {save_masks}/{{split}}/gt/")
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_iou_by_size({n: f["by_size"] for n, f in report["splits"].items()}, plot, subtitle=line)
        console.print(f"wrote {plot}")
