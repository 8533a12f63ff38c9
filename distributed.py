"""torchrun support: which process this is, joining the process group, rank-0-first blocks and small all-reduces.

Without torchrun every helper degrades to the single-process answer, so scripts never branch on it themselves.
"""
import contextlib
import os
import sys

import torch

import errors
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def log(*parts):
    """print() on rank 0 only."""
    if is_main():
        print(*parts, flush=True)


def init_distributed(device_flag):
    """The device of this process. Under torchrun (RANK set) also joins the process group: NCCL on CUDA, gloo on CPU.
    device_flag: --device as given (None: CUDA if available)."""
    if (device_flag or "").startswith("cuda") and not torch.cuda.is_available():
        raise errors.UserError(f"--device {device_flag} but CUDA is not available here; use --device cpu")
    want_cuda = device_flag.startswith("cuda") if device_flag else torch.cuda.is_available()
    if "RANK" not in os.environ:
        return torch.device(device_flag or ("cuda" if want_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not is_distributed():
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if want_cuda else "gloo")
        errors.before_exit(end_process)
    return torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")


def end_process(status):
    """End this torchrun process with `status` once its script's main has ended: flush the output, leave the process
    group (after a success; after a failure the peers may still wait in a collective), and exit without Python's
    teardown. gloo's worker threads may still be releasing a finished collective while the interpreter finalizes
    (DDP's all-reduces hold Python objects, released under the GIL); such a thread is then stopped inside a C++
    destructor and the process aborts ("terminate called without an active exception", SIGABRT), so torchrun reports a
    run that succeeded as failed (a few runs in a hundred here). The scripts have written and closed every file by
    then."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 0 and is_distributed():
        dist.destroy_process_group()
    os._exit(status)


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. builds a cache), the other ranks after it (and find it built)."""
    if not is_main():
        dist.barrier()
    yield
    if is_distributed() and is_main():
        dist.barrier()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (returned unchanged in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module):
    """Rank 0's BatchNorm statistics on every rank, so all ranks evaluate (and save) the same model."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b, 0)


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (e.g. a timestamped run folder)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_dict(part):
    """The union of every process's dict (e.g. per-image scores, each rank holding its share), on every process."""
    if not is_distributed():
        return dict(part)
    parts = [None] * world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}
