"""``--gpus N`` / ``--nproc N``: the launcher re-runs the same command under torchrun, one process
per device; each worker then finds itself under torchrun and does the work in place."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer

from shared_ris.distributed import free_port, launch, torchrun_command

# Options only the launcher reads; the workers learn their place from torchrun's environment.
LAUNCHER_OPTIONS = frozenset({"gpus", "nproc", "nnodes", "node_rank", "master_addr", "master_port"})
CLI_MODULE = "cli.main"


def _text(value) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def worker_args(ctx: typer.Context, **replace) -> list[str]:
    """The running command's options as parsed (not as typed), minus the launcher's, with ``replace``
    applied: what each worker runs."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        if param.name in LAUNCHER_OPTIONS:
            continue
        value = replace.get(param.name, ctx.params.get(param.name))
        if value is None or value is False or value == []:
            continue
        if param.param_type_name == "argument":
            args += [_text(v) for v in value] if param.multiple else [_text(value)]
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        if getattr(param, "is_flag", False):
            args.append(flag)
        else:
            args += [item for v in (value if param.multiple else [value]) for item in (flag, _text(v))]
    return args


def relaunch(
    ctx: typer.Context,
    processes: int,
    *,
    device: str | None,
    stop_file: Path | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    **replace,
) -> NoReturn:
    """Run the command of ``ctx`` on ``processes`` local workers (× ``nnodes``) under torchrun and exit with
    its status. ``stop_file``: see :func:`shared_ris.distributed.launch`."""
    args = worker_args(ctx, device=device, **replace)
    port = master_port or (free_port() if nnodes == 1 else 29500)
    command = torchrun_command(
        processes, args, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=port, module=CLI_MODULE
    )
    raise typer.Exit(launch(command, processes, stop_file=stop_file))
