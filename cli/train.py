"""``sris train``: one process in place, or several through torchrun (which re-enters this command)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shared_ris.config import load_recipe
from shared_ris.data.location import data_location
from shared_ris.distributed import check_gpus, is_main_process, under_torchrun
from shared_ris.train import preflight
from shared_ris.train import train as run_training

from .common import AllowPipeOption, DataOption, RecipeOption, SetOption, console, fail, user_errors
from .launch import relaunch


class ProgressView:
    """Rank 0's view of a run: a live bar on a terminal, plain log lines otherwise (SLURM logs)."""

    def __init__(self) -> None:
        self.live = console.is_terminal
        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not self.live,
        )  # fmt: skip
        self.task = None
        self.img_s = 0.0
        self.stats = ""

    def __enter__(self) -> "ProgressView":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.task = self.bar.add_task("train", total=event["total_steps"], completed=event["step"], stats="")
            self.bar.console.print(
                f"{event['world_size']} process(es), {event['steps_per_epoch']} steps per epoch, "
                f"{event['total_steps']} steps from step {event['step']}"
            )
        elif kind == "step":
            if "loss" in event:  # losses come with check-ins (every train.log_every steps); the bar moves every step
                self.img_s = event.get("img_s", self.img_s)
                self.stats = f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  {self.img_s:.1f} img/s"
                if not self.live:
                    console.print(f"step {event['step']}/{event['total_steps']} epoch {event['epoch']}  {self.stats}", highlight=False, soft_wrap=True)
            self.bar.update(self.task, completed=event["step"], stats=self.stats)
        elif kind == "val":
            figures = "  ".join(f"{k} {event[k]:.4f}" for k in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9"))
            self.bar.console.print(f"val (epoch {event['epoch']}, step {event['step']}, {event['n']} expressions): {figures}", highlight=False, soft_wrap=True)
        elif kind == "message":
            self.bar.console.print(event["text"], highlight=False, soft_wrap=True)


def _check_launch_options(gpus, nproc, nnodes: int, node_rank: int, master_port) -> None:
    if gpus is not None and nproc is not None:
        fail("give --gpus or --nproc, not both")
    if (gpus is not None and gpus < 0) or (nproc is not None and nproc < 1) or nnodes < 1:
        fail("--gpus counts GPUs (0 = CPU), --nproc and --nnodes count processes and nodes (1 or more)")
    if not 0 <= node_rank < nnodes:
        fail(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    if master_port is not None and not 1 <= master_port <= 65535:
        fail(f"--master-port must be a TCP port (1-65535), got {master_port}")


@user_errors
def train(
    ctx: typer.Context,
    data: str = DataOption,
    allow_pipe: bool = AllowPipeOption,
    recipe: str = RecipeOption,
    out: Path = typer.Option(None, "--out", "-o", help="Run folder [default: runs/RECIPE]."),
    gpus: int = typer.Option(None, "--gpus", help="GPUs on this node, one process each; more than 1 launches torchrun."),
    nproc: int = typer.Option(None, "--nproc", help="CPU processes over gloo (machines without GPUs, tests)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes in the job (multi-node: run this command on every node)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank, 0 … nnodes-1."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Host name or IP of the node with rank 0."),
    master_port: int = typer.Option(None, "--master-port", help="A free TCP port on the rank-0 node [default: any free port on one node, 29500 on several]."),
    pretrained: Path = typer.Option(None, "--pretrained", help="Official BEiT-3 weights, e.g. beit3_base_patch16_224.pth."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="beit3.spm [default: DATA/spm.model when present]."),
    overrides: list[str] = SetOption,
    resume: str = typer.Option(None, "--resume", help="'auto' (continue OUT/last.pt if present) or a checkpoint path."),
    device: str = typer.Option(None, "--device", hidden=True, help="cpu or cuda; set for the workers torchrun starts."),
) -> None:
    """Train Shared-RIS; SIGTERM / Ctrl-C save last.pt and exit 0 (continue with --resume auto)."""
    overrides = overrides or []
    resolved = load_recipe(recipe, overrides)
    location = data_location(data, allow_pipe=allow_pipe)
    out = out or Path("runs") / resolved.name
    _check_launch_options(gpus, nproc, nnodes, node_rank, master_port)
    device = device or ("cpu" if nproc is not None or gpus == 0 else None)
    if under_torchrun():  # a worker that torchrun started: train in place
        return _run(resolved, location, out, pretrained, tokenizer, resume, device)

    per_node = gpus or nproc or 1
    if gpus is not None:
        check_gpus(gpus)
    preflight(resolved, location, pretrained=pretrained, tokenizer_path=tokenizer, resume=resume, world_size=per_node * nnodes, out_dir=out)
    if per_node * nnodes == 1:
        return _run(resolved, location, out, pretrained, tokenizer, resume, device)
    relaunch(
        ctx, per_node, device=device, out=out, stop_file=out / "last.pt", nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr, master_port=master_port,
    )  # fmt: skip


def _run(recipe, data, out, pretrained, tokenizer, resume, device) -> None:
    if not is_main_process():  # other ranks stay quiet
        run_training(recipe, data, out, pretrained=pretrained, tokenizer_path=tokenizer, resume=resume, device=device)
        return
    with ProgressView() as view:
        summary = run_training(
            recipe, data, out, pretrained=pretrained, tokenizer_path=tokenizer, resume=resume, device=device, progress=view
        )
    if summary["stopped"]:
        console.print(f"stopped at step {summary['step']}; saved {out / 'last.pt'} (continue with --resume auto)")
    else:
        console.print(f"done: {summary['step']} steps in {summary['wall_s'] / 60:.1f} min, best val oIoU {summary['best_oiou']:.4f}; run in {out}")
