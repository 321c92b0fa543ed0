"""Running as one of several processes (torchrun + DistributedDataParallel) and being pre-empted.

Everything here is a no-op in a single process started without torchrun, so trainers call
these helpers unconditionally.

Launch: ``torchrun --nproc_per_node=K script.py ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them, picks the device
(``cuda:LOCAL_RANK`` when CUDA is used, else the CPU) and the backend (nccl on CUDA, gloo
on the CPU) and joins the process group.

Batches: every process draws the same *global* batch from generators seeded alike (so the
generators stay in step and rank 0's saved RNG state is everyone's), then keeps its
contiguous share, ``local_share``, whose ``loss_weight`` scales the share's mean loss so
that DDP's gradient average is the gradient of the global batch's mean, whatever the share
sizes (an empty share, when a batch has fewer items than processes, borrows one item with
weight 0).

Pre-emption: ``PreemptionGuard`` turns SIGTERM, SIGUSR1, SIGHUP and Ctrl-C (SIGINT) into a flag
that the training loop polls after each epoch (all ranks agree on it), so the run saves
``latest`` and exits with ``EXIT_PREEMPTED`` (130 after Ctrl-C).

Collectives on the CPU (gloo) return only once gloo's worker thread has let go of their
tensors (``_collective``): the worker drops its reference a little after the result is
ready, and dropping a tensor Python created needs the GIL; a worker still waiting for it
when the interpreter shuts down is ended by CPython inside a C++ destructor, which aborts
the process ("terminate called without an active exception").  destroy_process_group does
not join gloo's workers here, since DistributedDataParallel keeps the group alive.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MeshSDFError
from ..log import info
from ..runtime import choose_device

# 128 + SIGTERM: what a shell reports for a process killed by SIGTERM, so schedulers and
# torchrun see an interrupted run (torchrun --max-restarts restarts it), never a finished one.
EXIT_PREEMPTED = 128 + int(signal.SIGTERM)

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# the rendezvous store of the group this process joined (SharedCounter hands out numbers through it)
_STORE: dist.Store | None = None


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``backend`` is None in a single process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def where(self) -> str:
        """Where training runs, for messages: "2 processes (gloo)" or the device."""
        return f"{self.world_size} processes ({self.backend})" if self.distributed else str(self.device)


def env_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment; (0, 1, 0) without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    values = []
    for key, default in zip(_ENV_KEYS, ("0", "1", "0")):
        raw = os.environ.get(key, default)
        try:
            values.append(int(raw))
        except ValueError:
            raise MeshSDFError(f"environment variable {key}={raw!r} is not an integer; launch with torchrun "
                               "or unset RANK/WORLD_SIZE/LOCAL_RANK") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise MeshSDFError(f"inconsistent torchrun environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local


def _device_for_rank(name: str | None, local_rank: int) -> torch.device:
    """The device of one process of a multi-process job: cuda:LOCAL_RANK or the CPU."""
    if name is not None and name not in ("auto", "cpu", "cuda"):
        try:
            explicit_cuda = torch.device(name).type == "cuda"
        except (RuntimeError, ValueError):
            explicit_cuda = False
        if explicit_cuda:
            raise MeshSDFError(f"--device {name} under torchrun: give --device cuda (process k uses "
                               "cuda:LOCAL_RANK), cpu or auto")
        choose_device(name)  # a MeshSDFError naming what is wrong with it
    dev = choose_device(name)
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise MeshSDFError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {count}; run torchrun with "
                           f"--nproc_per_node={count} or fewer")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | None = None) -> DistContext:
    """Join torchrun's process group (when WORLD_SIZE > 1) and choose this process's device.

    ``device``: the script's --device (None/"auto", "cpu", "cuda"; "cuda:N" only in a
    single process).  nccl is used on CUDA, gloo on the CPU.  Idempotent.
    """
    rank, world, local = env_ranks()
    if world == 1:
        return DistContext(0, 1, 0, choose_device(device), None)
    dev = _device_for_rank(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        global _STORE
        _STORE = _attempt_store(rank, world)
        dist.init_process_group(backend, store=_STORE, rank=rank, world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(rank, world, local, dev, dist.get_backend())


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, with keys private to this restart attempt.

    torchrun keeps one store for all restarts of a job (TORCHELASTIC_USE_AGENT_STORE); with
    ``init_method="env://"`` the group restarted by ``--max-restarts`` finds the previous
    attempt's keys there and hangs in init_process_group (seen with torch 2.13).  Prefixing
    the keys with TORCHELASTIC_RESTART_COUNT gives every attempt a clean namespace.
    """
    from datetime import timedelta

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MeshSDFError(f"WORLD_SIZE={world} but {missing[0]} is not set; launch with torchrun")
    try:
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        raise MeshSDFError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number") from None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], port, world, is_master=not agent_hosts_store and rank == 0,
                          timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"meshsdf/attempt_{attempt}", store)


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _STORE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_RELEASE_POLL = 1e-4   # s between looks at whether gloo's worker let go of a tensor (each look yields the GIL)
_RELEASE_WAIT = 10.0   # s at most: the worker needs the GIL for microseconds once it gets it


def _collective(run, tensor: torch.Tensor) -> None:
    """``run(tensor)`` (a blocking collective on ``tensor``), returning once the backend holds no
    reference to ``tensor`` any more.

    Why: gloo's worker thread releases a finished collective's tensors after the caller has
    been woken, and releasing a tensor Python created takes the GIL; if the caller reaches
    interpreter shutdown first (the last collective of a rank with nothing to save), CPython
    ends the waiting worker with pthread_exit inside a C++ destructor and the process aborts
    (SIGABRT, "terminate called without an active exception").  Waiting here, with the GIL
    yielded, lets the worker finish first.  Only on gloo: nccl's works are released by its
    watchdog after the GPU is done, which must not stall each step.
    """
    uses = tensor._use_count()
    run(tensor)
    if dist.get_backend() == "gloo":
        # bounded: a reference held for another reason must not hang training
        deadline = time.monotonic() + _RELEASE_WAIT
        while tensor._use_count() > uses and time.monotonic() < deadline:
            time.sleep(_RELEASE_POLL)


def all_reduce_(tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of ``tensor`` over all ranks, in place; returned for chaining."""
    if is_distributed():
        _collective(dist.all_reduce, tensor)
        if mean:
            tensor.div_(dist.get_world_size())
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` of rank ``src`` copied to every rank, in place."""
    if is_distributed():
        _collective(lambda t: dist.broadcast(t, src), tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    _collective(lambda x: dist.all_reduce(x, op=dist.ReduceOp.MAX), t)
    return bool(t.item() > 0)


def sum_over_ranks(value: int) -> int:
    """The sum of an integer over all ranks, on every rank (``value`` itself in a single process)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    all_reduce_(t)
    return int(t.item())


class SharedCounter:
    """0, 1, 2, ... handed out across all ranks of the job, each number to exactly one caller.

    A work queue over a list every rank built alike: ``while (j := counter.take()) < len(jobs)``
    gives each job to the first rank free for it (ranks that finish early take more), and a
    rank that dies loses only the numbers it took.  The count lives in the rendezvous store of
    this restart attempt (``_attempt_store``), so a restarted group starts again from 0; in a
    single process it is a plain counter.  ``name`` keeps counters of one job apart.
    """

    def __init__(self, name: str):
        self.key = f"counter/{name}"
        self._local = 0
        if is_distributed() and _STORE is None:
            raise MeshSDFError("SharedCounter needs the process group joined by init_distributed")

    def take(self) -> int:
        """The next number (atomic across ranks)."""
        if is_distributed():
            return int(_STORE.add(self.key, 1)) - 1
        self._local += 1
        return self._local - 1


# --------------------------------------------------------------------------- batches

def local_slice(global_size: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of a global batch of ``global_size`` items.

    Shares differ by at most one item and may be empty (fewer items than processes).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(int(global_size), w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def loss_weight(local_size: int, global_size: int, world: int | None = None) -> float:
    """Factor for a shard's *mean* loss so that DDP's averaged gradient is the global mean's.

    DDP averages gradients over W ranks: (1/W) sum_r grad(w_r mean_r).  With
    w_r = W n_r / N this is grad(sum over all items / N), the 1-process gradient.  1.0 in a
    single process.
    """
    w = world_size() if world is None else world
    return w * local_size / global_size if w > 1 else 1.0


def local_share(global_size: int) -> tuple[slice, float]:
    """(rows of a global batch this rank trains on, ``loss_weight`` for their mean loss).

    A rank whose share is empty borrows item 0 with weight 0: it still runs forward and
    backward (DDP needs every rank in each gradient all-reduce, and layers such as
    InstanceNorm cannot take an empty batch) but adds nothing.  (everything, 1.0) in a
    single process.
    """
    w = world_size()
    if w == 1:
        return slice(0, global_size), 1.0
    part = local_slice(global_size)
    n = part.stop - part.start
    if n == 0:
        return slice(0, 1), 0.0
    return part, loss_weight(n, global_size, w)


def check_global_batch(global_size: int, key: str = "ScenesPerBatch") -> None:
    """On rank 0, say so when a global batch of ``global_size`` (specs ``key``) leaves some ranks idle."""
    w = world_size()
    if global_size < w and is_main_process():
        info(f"{key} {global_size} < {w} processes: some ranks get no scenes; raise {key} (the global batch) "
             "or use fewer processes")


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``module`` in DistributedDataParallel when running distributed, else ``module`` itself.

    DDP broadcasts rank 0's parameters at construction and averages gradients in
    backward; the optimizer and checkpoints keep using the unwrapped ``module``.
    """
    if not is_distributed():
        return module
    device = torch.device(device) if device is not None else next(module.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers of ``module`` made SyncBatchNorm when running distributed on CUDA.

    Then the statistics are those of the global batch, as in one process; parameters and
    state-dict keys are unchanged, so checkpoints are the same.  SyncBatchNorm has no CPU
    implementation: on the CPU each rank normalises with its own share's statistics.
    Call it before building the optimizer.
    """
    if not is_distributed() or next(module.parameters()).device.type != "cuda":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def broadcast_parameters_(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` (not held by DDP, e.g. latent codes) to all ranks."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            broadcast_(p.data, src)


class GradientSync:
    """After backward: average the gradients of parameters DDP does not hold, and the loss.

    ``GradientSync(params)(loss)`` all-reduces, in one collective, the (possibly missing =
    zero) ``.grad`` of each of ``params`` and the loss value; returns the global mean loss
    (a 0-dim tensor) and leaves every rank with the same averaged gradients.  Pass it as
    ``sync`` to ``lib.training.loop.optimizer_step``.
    """

    def __init__(self, params: Sequence[torch.Tensor] = ()):
        self.params = list(params)

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return loss.detach()
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
                 for p in self.params]
        flat = torch.cat(parts + [loss.detach().reshape(1).to(parts[0].dtype if parts else loss.dtype)])
        all_reduce_(flat, mean=True)
        offset = 0
        for p in self.params:
            n = p.numel()
            mean = flat[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            offset += n
        return flat[-1]


def stop_status(ctx: DistContext, stopped: bool, epoch: int, guard: "PreemptionGuard",
                exp_dir: str | os.PathLike) -> int | None:
    """What a training script returns once training ended, or None where it goes on (rank 0 of
    a finished run: reports, reconstructions).

    A run stopped by a signal returns ``guard.exit_status`` (130 for Ctrl-C, else
    ``EXIT_PREEMPTED``) on every rank, and rank 0 says which signal, where ``latest`` (epoch
    ``epoch``) is and which epoch resuming starts at; the other ranks of a finished run return 0.
    """
    if stopped:
        if ctx.is_main:
            info(f"stopped by {guard.reason} after epoch {epoch}; saved 'latest' (epoch {epoch}) in {exp_dir}; "
                 f"--continue latest resumes at epoch {epoch + 1}")
        return guard.exit_status
    return None if ctx.is_main else 0


def rank_seed(base: int, epoch: int, rank_: int | None = None) -> int:
    """A seed for rank-local randomness (dropout masks) of ``epoch``: distinct per rank and epoch."""
    r = rank() if rank_ is None else rank_
    return ((int(base) * 1_000_003 + int(epoch)) * 7_919 + r) % (2 ** 63)


# --------------------------------------------------------------------------- pre-emption

class PreemptionGuard:
    """Context manager: SIGTERM, SIGUSR1 (which SLURM's --signal sends), SIGHUP (a closed terminal or
    ssh session) and SIGINT (Ctrl-C) set a stop flag.

    Call the guard as ``should_stop(epoch)``: true once this process received a signal.
    The trainers agree across ranks (``lib.training.loop.EpochBook.end_epoch`` asks ``any_rank``),
    so all ranks leave the loop after the same epoch (rank 0 then writes ``latest``).  A
    second signal kills the process at once (the default action; the epochs since the last
    save are lost, never the saved files).  Handlers are installed only in the main thread;
    the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self, signals: Sequence[signal.Signals] = SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: stop waiting for the epoch to end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if is_main_process():
            again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            info(f"{signal.Signals(signum).name}: finishing this epoch, then saving 'latest' "
                 f"({again} again stops at once, losing the epochs since the last save)")

    def __enter__(self) -> "PreemptionGuard":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __call__(self, epoch: int) -> bool:
        return self.received is not None

    @property
    def reason(self) -> str:
        """What stopped the run, for messages: the signal's name, or another process's signal."""
        return signal.Signals(self.received).name if self.received is not None else "a signal to another process"

    @property
    def exit_status(self) -> int:
        """130 (128 + SIGINT, what a shell reports for Ctrl-C) after SIGINT, else ``EXIT_PREEMPTED``."""
        return 128 + int(signal.SIGINT) if self.received == signal.SIGINT else EXIT_PREEMPTED
