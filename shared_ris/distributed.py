"""Process-group set-up from torchrun's environment, tiny collectives, and the torchrun launcher.

One process runs in place (no process group). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set)
each process joins a group: NCCL when it drives a GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .device import pick_device
from .errors import SharedRISError


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class LaunchError(SharedRISError):
    """The requested processes cannot be started (e.g. more GPUs than the machine has)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True inside a process that torchrun (or an equivalent launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere a no-op).

    Workers use it so that killing a launcher, even with SIGKILL, takes its workers down instead
    of leaving them running (SIGTERM: training workers save ``last.pt`` first)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def is_main_process() -> bool:
    """True alone and on torchrun's rank 0: the process that prints and writes reports."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK and join the process group when there are several processes."""
    if not under_torchrun():
        return DistEnv(device=pick_device(0, device))
    exit_with_parent(signal.SIGTERM)  # if torchrun dies, save and stop rather than run on as an orphan
    if int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(device=pick_device(0, device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, dev)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of a few numbers over all processes (one collective)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, …] on every rank."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_gpus(gpus: int) -> None:
    """One-line error when more GPUs are asked for than this machine has."""
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > present:
        raise LaunchError(f"--gpus {gpus} asked for but this machine has {present} GPU(s); use --nproc N for CPU processes")


def torchrun_command(
    nproc_per_node: int,
    module_args: list[str],
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    *,
    module: str,
) -> list[str]:
    """``python -m torch.distributed.run … -m MODULE ARGS``: the static-rendezvous torchrun line."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}",
        "-m", module, *module_args,
    ]  # fmt: skip


def child_processes(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, from Linux's /proc ([] elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command name in parentheses
            found.append(int(entry.name))
    return found


def launch(command: list[str], nproc_per_node: int, stop_file: Path | None = None) -> int:
    """Run ``command`` (a :func:`torchrun_command` line) and wait; pass SIGTERM / SIGINT to the workers.

    torchrun runs in its own session and dies with this process (:func:`exit_with_parent`), so a
    killed launcher never leaves a run going. A stop signal goes straight to torchrun's workers,
    which save ``last.pt`` and exit 0, so torchrun ends cleanly instead of printing its own signal
    traceback (it gets the signal itself only before its workers exist). Returns the child's exit
    status, or 0 when a stop signal was passed on and ``stop_file`` (``last.pt``) was written after
    it. CPU threads are split between the node's processes unless OMP_NUM_THREADS is set, and
    torchrun waits up to 600 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; its default is 30) for workers to save.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=exit_with_parent)
    signalled_at: list[float] = []

    def forward(signum, _frame):
        signalled_at.append(time.time())
        for pid in child_processes(child.pid) or [child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    saved = stop_file is not None and stop_file.is_file() and signalled_at and stop_file.stat().st_mtime >= signalled_at[0]
    return 0 if saved else code
