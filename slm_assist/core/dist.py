"""Process-group helpers: the same code runs as a plain process, under `torchrun`, or under `deepspeed`."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from slm_assist.core.errors import UserError

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """A plain single process gets the env vars that torchrun / the deepspeed launcher would set."""
    if "RANK" not in os.environ and "LOCAL_RANK" in os.environ:  # deepspeed --local_rank style
        os.environ["RANK"] = os.environ["LOCAL_RANK"]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> None:
    """Initialise the process group once (gloo on CPU, nccl on CUDA) via DeepSpeed's comm layer."""
    import deepspeed

    ensure_env()
    # DeepSpeed's ZeRO calls the deprecated collective names once per step; the warning floods the logs.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)`")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: one rank's non-finite loss stops all ranks at the same step."""
    if not torch_dist.is_initialized() or world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float]) -> list[float]:
    if not torch_dist.is_initialized() or world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a picklable value: what one rank decided, e.g. which checkpoint to resume)."""
    if not torch_dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (a decision that reads or changes shared files once); every rank gets its result or
    raises: rank 0 its own exception, the others the same UserError, or a UserError saying what rank 0 hit, so no
    rank waits at a collective for one that failed."""
    outcome: tuple[bool, object] | None = None
    error: BaseException | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:
            error = e
            outcome = (False, e if isinstance(e, UserError) else UserError(f"rank 0 failed: {type(e).__name__}: {e}"))
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise value
    return value
