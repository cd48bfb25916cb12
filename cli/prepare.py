"""``sris prepare``: RefCOCO/+/g, their union, or the synthetic set → WebDataset shards + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from shared_ris.data import export_examples, prepare_refer, prepare_synthetic
from shared_ris.data.prepare import prepare_parquet, standard_counts
from shared_ris.data.targets import TARGET_GROUPS

from .common import console, fail, user_errors

prepare_app = typer.Typer(
    help="Convert a dataset to WebDataset shards ({dataset}-{split}-NNNNNN.tar) plus manifest.json. "
    "Re-running the same command resumes from the finished shards.",
    no_args_is_help=True,
)

ReferRoot = typer.Option(None, "--refer-root", help="The refer API data folder: refcoco/refs(unc).p, refcoco/instances.json, ...")
Parquet = typer.Option(
    None, "--parquet",
    help="Instead of --refer-root: a folder of the Hugging Face parquet copies (jxu124/refcoco, jxu124/refcocoplus, "
    "jxu124/refcocog), every *.parquet in it or below. Needs pip install 'shared-ris[parquet]'.",
)  # fmt: skip
Images = typer.Option(..., "--images", help="COCO train2014/ (COCO_train2014_000000000009.jpg, ...).")
Out = typer.Option(..., "--out", help="Output folder (one per dataset).")
ShardSize = typer.Option(1000, "--shard-size", min=1, help="Refs per shard.")
Workers = typer.Option(None, "--workers", min=1, help="Processes writing shards (default: CPU count, at most 8).")
Limit = typer.Option(None, "--limit", min=1, help="Keep the first N refs of each split (quick trials).")
Strict = typer.Option(False, "--strict", help="Fail on the first skipped item instead of counting it.")
Overwrite = typer.Option(False, "--overwrite", help="Rebuild from scratch instead of resuming.")


def _run(what: str, fn: Callable[..., dict], **kwargs) -> dict:
    """Call ``fn`` with a progress callback: a spinner while inputs load, then a bar with refs/s and ETA."""
    columns = (
        TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} refs/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=console)
    task = bar.add_task(what, total=None, rate="-")
    with console.status(f"{what}: reading inputs...") as status:

        def progress(done: int, total: int) -> None:
            if not bar.live.is_started:
                status.stop()
                bar.start()
            bar.update(task, completed=done, total=total)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.0f}" if speed else "-")

        try:
            manifest = fn(progress=progress, **kwargs)
        finally:
            bar.stop()
    _summary(manifest, Path(kwargs["out_dir"]))
    return manifest


def _summary(manifest: dict, out: Path) -> None:
    table = Table(title=f"{manifest['dataset']} → {out}")
    for column in ("split", "samples", "sentences", "images", "shards", "MB", "empty masks", "empty texts (sent/raw)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        empty_texts = split.get("empty_text_sentences", {})
        table.add_row(
            name, str(split["samples"]), str(split["sentences"]), str(split["images"]), str(len(split["shards"])),
            f"{split['bytes'] / 1e6:.1f}", str(split.get("empty_mask_samples", 0)), f"{empty_texts.get('sent', 0)}/{empty_texts.get('raw', 0)}",
        )  # fmt: skip
    console.print(table)
    if any(split.get("empty_mask_samples") or any(split.get("empty_text_sentences", {}).values()) for split in manifest["splits"].values()):
        learned = "; the empty masks of no-target refs are answers: training learns them" if manifest.get("generalized") else ""
        console.print(f"empty masks and empty texts are kept: sris eval scores them (as the papers do), training skips them{learned}", style="dim")
    if "excluded_images" in manifest:
        console.print(f"train: dropped {manifest['excluded_refs']} refs on {manifest['excluded_images']} images that appear in a val/test split")
    if manifest["sources"].get("duplicate_rows"):
        console.print(f"[yellow]{manifest['sources']['duplicate_rows']} refs appear in two parquet files with the same content (kept once): a stale copy of a split in --parquet?[/]")
    _standard_counts(manifest)
    if manifest.get("generalized"):
        _target_counts(manifest)
    if manifest["skipped_counts"]:
        skipped = Table(title="skipped (details in manifest.json)")
        skipped.add_column("reason")
        skipped.add_column("count", justify="right")
        for reason, count in manifest["skipped_counts"].items():
            skipped.add_row(reason, str(count))
        console.print(skipped)
    else:
        console.print("nothing skipped")


def _target_counts(manifest: dict) -> None:
    """A generalized set's refs and expressions by how many objects they name."""
    table = Table(title="by target count: refs / expressions")
    for column in ("split", *(f"{group} target{'' if group == '1' else 's'}" for group in TARGET_GROUPS)):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        refs, sentences = split.get("target_samples", {}), split.get("target_sentences", {})
        table.add_row(name, *(f"{refs.get(group, 0):,} / {sentences.get(group, 0):,}" for group in TARGET_GROUPS))
    console.print(table)


def _standard_counts(manifest: dict) -> None:
    """Each split beside the refer API's counts, so an incomplete download shows before training."""
    for row in standard_counts(manifest):
        if row.standard is None:
            continue
        if row.matches:
            console.print(row.describe(), highlight=False)
        else:
            console.print(f"[yellow]warning: {escape(row.describe())}[/]", highlight=False)


def _refer_command(dataset: str, split_by_default: str | None, split_by_help: str, splits_help: str, doc: str):
    """One ``sris prepare`` command of the refer family (the combined set has no --split-by)."""

    @user_errors
    def command(
        refer_root: Optional[Path] = ReferRoot,
        parquet: Optional[Path] = Parquet,
        images: Path = Images,
        out: Path = Out,
        split_by: Optional[str] = typer.Option(split_by_default, "--split-by", help=split_by_help, hidden=split_by_default is None),
        splits: Optional[str] = typer.Option(None, "--splits", help=splits_help),
        shard_size: int = ShardSize,
        workers: Optional[int] = Workers,
        limit: Optional[int] = Limit,
        strict: bool = Strict,
        overwrite: bool = Overwrite,
    ) -> None:
        if (refer_root is None) == (parquet is None):
            fail("give the refs as --refer-root (the refer API's data folder) or --parquet (the Hugging Face parquet copies), one of the two")
        what = f"{dataset} ({split_by})" if split_by else dataset
        common = dict(dataset=dataset, images_dir=images, out_dir=out, split_by=split_by, splits=splits, shard_size=shard_size,
                      workers=workers, limit=limit, strict=strict, overwrite=overwrite)  # fmt: skip
        if parquet is not None:
            _run(what, prepare_parquet, parquet_dir=parquet, **common)
        else:
            _run(what, prepare_refer, refer_root=refer_root, **common)

    command.__doc__ = doc
    return command


SUBSET = "Comma-separated subset, e.g. val,testA (default: all)."
for _dataset, _split_by, _split_by_help in (
    ("refcoco", "unc", "unc (train/val/testA/testB) or google."),
    ("refcoco+", "unc", "unc (train/val/testA/testB)."),
    ("refcocog", "umd", "umd (train/val/test) or google (train/val)."),
):
    _doc = f"{_dataset}: refs({_split_by}).p + instances.json (or the Hugging Face parquet copy) + COCO images → shards."
    prepare_app.command(_dataset)(_refer_command(_dataset, _split_by, _split_by_help, SUBSET, _doc))
prepare_app.command("refcoco-combined")(_refer_command(
    "refcoco-combined", None, "Fixed: unc for RefCOCO/+, umd for RefCOCOg.",
    "train and/or {dataset}-{split} names (default: train,refcoco-val,refcoco+-val,refcocog-val).",
    "Train on RefCOCO + RefCOCO+ + RefCOCOg, minus every image of any of their val/test splits.",
))  # fmt: skip
prepare_app.command("grefcoco")(_refer_command(
    "grefcoco", "unc", "unc (train/val/testA/testB), the only one gRefCOCO ships.", SUBSET,
    "gRefCOCO (generalized: several targets or none): grefcoco/grefs(unc).json + instances.json + COCO images → shards.",
))  # fmt: skip


@prepare_app.command("synthetic")
@user_errors
def synthetic(
    out: Path = Out,
    train: int = typer.Option(4000, "--train", min=0, help="Training refs (one image each)."),
    val: int = typer.Option(300, "--val", min=0, help="Validation refs."),
    test: int = typer.Option(300, "--test", min=0, help="Test refs."),
    size: int = typer.Option(128, "--size", min=64, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="The set is a pure function of the seed, counts and size."),
    shard_size: int = ShardSize,
    workers: Optional[int] = Workers,
    overwrite: bool = Overwrite,
    examples: int = typer.Option(8, "--examples", min=0, help="Also write this many loose images + prompts.jsonl to OUT/examples for sris predict."),
    spatial: bool = typer.Option(False, "--spatial", help='Also relational expressions ("the leftmost red one"): harder, beyond the tiny quickstart.'),
    generalized: bool = typer.Option(
        False, "--generalized",
        help='gRefCOCO-style: also several targets ("all the red shapes", "the two circles") and none ("the green triangle" where there is none).',
    ),
) -> None:
    """Referring shapes ("the small red circle") in the same shard format, plus spm.model for the tiny recipe."""
    _run(
        "synthetic", prepare_synthetic, out_dir=out, train=train, val=val, test=test, size=size, seed=seed,
        shard_size=shard_size, workers=workers, overwrite=overwrite, spatial=spatial, generalized=generalized,
    )
    if examples:
        folder = export_examples(out / "examples", examples, size=size, seed=seed, spatial=spatial, generalized=generalized)
        console.print(f"wrote {examples} example images and prompts.jsonl to {folder}")
