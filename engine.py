"""The training loop every train_*.py shares, in the order a run goes through it (train()):

1. set-up (setup()): device and process group, seeds, precision, run folder, --resume path: a frozen TrainConfig;
2. Adam + ReduceLROnPlateau on val mIoU (+ a GradScaler for fp16), built in train() where you can see them;
3. --resume: restore_checkpoint() puts back what make_checkpoint() saved, including a half-done epoch (EpochProgress);
4. per epoch: train_one_epoch() over that epoch's batches (DDP under torchrun), compute_metrics() on val, scheduler
   step;
5. rank 0 writes last.pth / best.pth / epoch_NNN.pth (atomically), history.json, config.json and the plots.

A SIGINT/SIGTERM lets the current batch finish, saves an exact mid-epoch checkpoint and exits; --resume then
continues with the same batches and random numbers, so the history equals an uninterrupted run's.
"""
import argparse
import atexit
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import device_data
import errors
import fileio
import flags
import plots
import voc
from distributed import (all_reduce_sum, broadcast_buffers, broadcast_object, init_distributed, is_distributed,
                         is_main, log, rank, world_size)

# ---------------------------------------------------------------------------------------------
# Precision: a recorded choice, never a side effect of the host
# ---------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def low_precision(device):
    """The 16-bit type a device runs best: bf16 on CUDA where supported (else fp16), bf16 on CPU (native on
    AVX512-BF16/AMX CPUs, emulated elsewhere, with the same rounding either way)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def resolve_amp(amp, device):
    """--amp as given ('auto', 'bf16', 'fp16' or None) -> the autocast type this run uses ('fp32' = off)."""
    if amp is None:
        return "fp32"
    return low_precision(device) if amp == "auto" else amp


def autocast(device, precision):
    """Autocast to precision ('bf16'/'fp16') on device; 'fp32' runs in full precision."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def add_amp_arg(parser, trains=True):
    """--amp; trains=False: a script that only runs the networks forward (no gradient scaler to mention)."""
    parser.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"), default=None,
                        help=f"mixed precision (autocast): bf16, or fp16{' with a gradient scaler' if trains else ''}; "
                             f"--amp alone picks bf16 where the device supports it (CPU, recent GPUs), else fp16 "
                             f"(default: off, fp32)")
    return parser


# ---------------------------------------------------------------------------------------------
# Flags and set-up
# ---------------------------------------------------------------------------------------------

def add_training_args(parser, default_epochs=50):
    """Flags of the shared training loop (every train_*.py): the recipe, the seed, and the run's folder and start."""
    add_recipe_args(parser, default_epochs, seed=True)
    parser.add_argument("--out-dir", default=None,
                        help="run folder for checkpoints, history and plots (default: checkpoints/<strategy>_<time>)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue a run from PATH, a last.pth (no PATH: OUT_DIR/last.pth)")
    parser.add_argument("--init-weights", default=None, metavar="PATH",
                        help="start a new run from the network weights of PATH (a run's best.pth, epoch_NNN.pth or "
                             "last.pth; same architecture and classes); optimizer and schedule start fresh "
                             "(default: pretrained weights, or random with --no-pretrained)")
    return parser


def recipe_dests():
    """The names (argparse dests) of the recipe flags: what compare.py passes alike to every run."""
    return set(vars(add_recipe_args(argparse.ArgumentParser(), seed=False).parse_args([])))


def add_recipe_args(parser, default_epochs=50, seed=True):
    """The training recipe: data, epochs, optimisation, precision, loop settings (a comparison gives every run the
    same); seed=False leaves --seed to the script (compare.py's --seeds)."""
    flags.add_data_args(parser, "training", seed=seed)
    pos_int, pos_float, nonneg_int, nonneg_float = (flags.positive_int, flags.positive_float,
                                                    flags.non_negative_int, flags.non_negative_float)
    parser.add_argument("--epochs", type=pos_int, default=default_epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=pos_int, default=16, help="batch size per process (default: %(default)s)")
    parser.add_argument("--lr", type=pos_float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=nonneg_float, default=1e-5,
                        help="Adam weight decay (default: %(default)s)")
    parser.add_argument("--lr-factor", type=flags.fraction, default=0.5,
                        help="ReduceLROnPlateau factor on val mIoU, in (0, 1) (default: %(default)s)")
    parser.add_argument("--lr-patience", type=nonneg_int, default=5,
                        help="ReduceLROnPlateau patience in epochs (default: %(default)s)")
    parser.add_argument("--limit-train", type=pos_int, default=None, help="use only the first N train images")
    parser.add_argument("--train-set", choices=("train", "trainaug"), default="train", help="VOC 2012 train (1,464 "
                        "images) or trainaug: + SBD, minus VOC val (10,582) (default: %(default)s)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="start from random weights instead of torchvision's pretrained ones")
    parser.add_argument("--save-every", type=pos_int, default=5,
                        help="also keep epoch_NNN.pth every N epochs (default: %(default)s)")
    add_amp_arg(parser)
    parser.add_argument("--accumulate", type=pos_int, default=1, help="optimizer step every N batches, "
                        "gradients accumulated: batch 16 as 4 x 4 on a small GPU (default: %(default)s)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="train in channels_last memory format: 1.5x the img/s of contiguous tensors for the "
                             "student on a 2-core AVX-512 CPU (bench_throughput.py), and what tensor cores want "
                             "(default: on)")
    parser.add_argument("--data-on-device", choices=device_data.MODES, default="auto",
                        help="hold the training split (uint8 pixels and masks, cached teacher logits) in the training "
                             "device's memory and augment each batch there (batched grid_sample): no loader workers "
                             "to wait for. auto: on for CUDA when the split takes at most "
                             f"{100 * device_data.FREE_MEMORY_SHARE:.0f} %% of its free memory, off on CPU "
                             "(default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (the student's forward and its loss; the first steps "
                             "compile, minutes on a CPU); measure it first (bench_throughput.py --compile both)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="synchronise BatchNorm statistics across torchrun processes (CUDA only)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip optimizer steps whose gradients are NaN/inf (default: stop the run, naming "
                             "the batch and loss term)")
    parser.add_argument("--log-every", type=pos_int, default=20, help="optimizer steps between reads of the running "
                        "loss (progress bar, NaN check, stop requests under torchrun) (default: %(default)s)")
    return parser


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs, resolved once from the command line by setup()."""
    strategy: str
    device: torch.device
    data: common.DataConfig
    out_dir: str
    resume: str | None
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_factor: float
    lr_patience: int
    save_every: int
    precision: str
    accumulate: int
    channels_last: bool
    data_on_device: str
    compile: bool
    sync_bn: bool
    skip_nonfinite: bool
    log_every: int
    flags: dict  # every flag as resolved: config.json and the checkpoint's "args"


def setup(args, strategy):
    """Device (and process group), seeds, precision and run folder of a training run."""
    device = init_distributed(args.device)
    data = common.data_config(args)
    precision = resolve_amp(args.amp, device)
    if args.sync_bn and device.type != "cuda":
        raise errors.UserError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    out_dir, resume = resolve_run_folder(args.out_dir, args.resume, strategy)
    if is_main():
        fileio.check_output_dir(out_dir, "--out-dir")  # before any slow work; leaves nothing behind
    seed_everything(args.seed)
    recorded = dict(vars(args), strategy=strategy, out_dir=out_dir, resume=resume, amp=precision,
                    image_size=data.image_size, cache_dir=data.cache_dir)
    return TrainConfig(strategy=strategy, device=device, data=data, out_dir=out_dir, resume=resume,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       lr_factor=args.lr_factor, lr_patience=args.lr_patience, save_every=args.save_every,
                       precision=precision, accumulate=args.accumulate, channels_last=args.channels_last,
                       data_on_device=args.data_on_device, compile=args.compile, sync_bn=args.sync_bn, skip_nonfinite=args.skip_nonfinite, log_every=args.log_every,
                       flags=recorded)


def load_initial_weights(model, path):
    """--init-weights: the network starts from the weights stored in path (a new run, not a resumed one)."""
    if path is None:
        return model
    arch = "teacher" if isinstance(model, common.Teacher) else "student"
    loaded = common.load_model(path, "--init-weights", expect_arch=arch)
    if loaded.num_classes != model.num_classes:
        raise errors.UserError(f"--init-weights {path} predicts {loaded.num_classes} classes, this run "
                               f"{model.num_classes}; use weights trained with the same --num-classes")
    model.load_state_dict(loaded.model.state_dict())
    log(f"initial weights: {path}")
    return model


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_folder(out_dir, resume, strategy):
    """(run folder, checkpoint to resume or None) from --out-dir / --resume; refuses to overwrite a run."""
    if resume:  # an explicit checkpoint path decides the run folder unless --out-dir says otherwise
        if not os.path.isfile(resume):
            raise errors.UserError(f"--resume {resume}: no such checkpoint")
        out_dir = out_dir or os.path.dirname(os.path.abspath(resume))
    if out_dir is None:
        if resume is not None:
            raise errors.UserError("--resume without PATH needs --out-dir (the run folder holding last.pth)")
        out_dir = broadcast_object(os.path.join("checkpoints", f"{strategy}_{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    if resume == "":
        resume = os.path.join(out_dir, "last.pth")
        if not os.path.isfile(resume):
            raise errors.UserError(f"--resume: {resume} does not exist; nothing to resume in --out-dir {out_dir}")
    elif resume is None and os.path.isfile(os.path.join(out_dir, "last.pth")):
        raise errors.UserError(f"--out-dir {out_dir} already holds a run (last.pth); pass --resume to "
                               f"continue it or choose another --out-dir")
    return out_dir, resume  # created by train(), once data and models are ready: a failed start leaves nothing


# ---------------------------------------------------------------------------------------------
# Data loading and evaluation
# ---------------------------------------------------------------------------------------------

def epoch_order(n, batch_size, generator, skip_batches=0):
    """This process's positions of one shuffled epoch of n items: one permutation for all ranks (generator's), cut to
    whole batches of every rank when there are more than one round of them (drop_last); rank r takes every world-th
    position (DistributedSampler's split); the first skip_batches batches are left out (resuming inside an epoch
    gives exactly the batches left)."""
    world, r = world_size(), rank()
    order = torch.randperm(n, generator=generator).tolist()
    if n > batch_size * world:
        order = order[:n // (batch_size * world) * batch_size * world]
    return order[r::world][skip_batches * batch_size:]


def make_loader(dataset, batch_size, workers, shuffle=False, generator=None, skip_batches=0, sampler=None,
                persistent=False, pin_memory=False):
    """Batches of dataset, this process's share of them: in order, or shuffled by generator's permutation
    (epoch_order), or as a given sampler yields them. persistent: the workers start once and serve every pass over
    the loader (until it is deleted), instead of starting again each time."""
    if sampler is None:
        sampler = (epoch_order(len(dataset), batch_size, generator, skip_batches) if shuffle else
                   list(range(rank(), len(dataset), world_size())))
    # an explicit generator also keeps the loader from drawing its worker seed from the global RNG, which would
    # shift dropout's random stream between an uninterrupted and a resumed run
    if workers:
        stop_workers_at_exit()
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=common.collate, pin_memory=pin_memory,
                                       persistent_workers=persistent and workers > 0,
                                       prefetch_factor=4 if workers else None,
                                       generator=generator or torch.Generator().manual_seed(0),
                                       worker_init_fn=ignore_stop_signals)


class EpochSampler(torch.utils.data.Sampler):
    """The items of this process's share of one epoch, as (epoch, position), set before each epoch: a sampler that
    lasts the run, so its loader's workers do too (persistent) and each item still carries its epoch's augmentation."""

    def __init__(self):
        self.items = []

    def set_epoch(self, epoch, order):
        self.items = [(epoch, k) for k in order]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class TrainBatches:
    """The training split's batches, epoch by epoch (for_epoch): augmented on the device from a DeviceSplit
    (--data-on-device), or from one DataLoader whose workers start once and serve every epoch (pinned memory on
    CUDA). The order of an epoch is seeded by (seed, epoch) alike on both paths."""

    def __init__(self, dataset, cfg):
        self.dataset, self.batch_size, self.seed = dataset, cfg.batch_size, cfg.data.seed
        nbytes = device_data.split_bytes(dataset)
        self.on_device = device_data.resolve(cfg.data_on_device, cfg.device, nbytes)
        device_data.describe(self.on_device, nbytes, cfg.data_on_device, cfg.data.workers)
        self.split = device_data.DeviceSplit(dataset, cfg.device) if self.on_device else None
        self.sampler = EpochSampler()
        self.loader = None if self.on_device else make_loader(dataset, cfg.batch_size, cfg.data.workers,
                                                              sampler=self.sampler, persistent=True,
                                                              pin_memory=cfg.device.type == "cuda")
        self.nbytes = nbytes

    def for_epoch(self, epoch, skip_batches=0):
        order = epoch_order(len(self.dataset), self.batch_size,
                            torch.Generator().manual_seed(self.seed * 100003 + epoch), skip_batches)
        if self.on_device:
            return device_data.DeviceBatches(self.split, order, self.batch_size, epoch)
        self.sampler.set_epoch(epoch, order)
        return self.loader

    def close(self):
        """Stop the loader's workers now and free the device copy."""
        close_loader(self.loader)
        self.loader = self.split = None


def close_loader(loader):
    """Stop a persistent loader's worker processes now: otherwise they last until its iterator is garbage-collected,
    which a reference cycle (a traceback, say) puts off, and compare.py trains run after run in one process."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):  # (a loader with workers, iterated once)
        iterator._shutdown_workers()
        loader._iterator = None


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT/SIGTERM to the main process: `timeout`, SLURM and Ctrl-C signal the whole process
    group, and a worker killed by it would take the run down before the main process could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@functools.cache
def stop_workers_at_exit():
    """Make sure a run that ends in an error exits. Its traceback keeps the loader alive until the interpreter exits,
    when PyTorch no longer stops workers and multiprocessing's exit handler terminates them with SIGTERM, which they
    ignore (ignore_stop_signals), then waits for them forever. This handler runs first and kills them."""
    atexit.register(kill_loader_workers)


def kill_loader_workers():
    # PyTorch's SIGCHLD handler would raise at the first killed worker, before the others are killed
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [p for p in multiprocessing.active_children() if p.daemon]  # nothing else this process starts is one
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


def batches(loader):
    """The batches of loader; a bad data file met while reading one, in a worker or here, ends the run with the one
    line that names it (not a traceback from inside the worker)."""
    try:
        yield from loader
    except voc.DataProblem as e:
        # a worker's exception arrives as "Caught DataProblem in DataLoader worker ...\n<its traceback>"
        raise errors.UserError(str(e).rstrip().splitlines()[-1].split("DataProblem: ", 1)[-1]) from None


@torch.no_grad()
def segment(model, views, sizes, device, precision="fp32", flip=False):
    """Scores (1, C, H, W) of each image j of a batch at sizes[j] (its mask's size). views: the batch's inputs, one
    (B, 3, h, w) tensor per scale. One view: its logits resized bilinearly (align_corners=False). Several (multi-scale,
    and with flip each input's mirror too, whose logits are mirrored back): each view's logits resized the same way
    and turned into probabilities, which are averaged; the scores are the log of that average. argmax(1) predicts.
    Views run one at a time, so memory is one view's activations plus the images' accumulated probabilities."""
    single = len(views) == 1 and not flip
    scores = [None] * len(sizes)
    for x in views:
        x = x.to(device, non_blocking=True)
        for mirrored in ((False, True) if flip else (False,)):
            with autocast(device, precision):
                logits = model(x.flip(-1) if mirrored else x).float()
            if mirrored:
                logits = logits.flip(-1)
            for j, size in enumerate(sizes):
                up = F.interpolate(logits[j:j + 1], size=size, mode="bilinear", align_corners=False)
                if single:
                    scores[j] = up
                else:
                    prob = up.softmax(1)
                    scores[j] = prob if scores[j] is None else scores[j] + prob
    if single:
        return scores
    n_views = len(views) * (2 if flip else 1)
    return [(s / n_views).log() for s in scores]


@torch.no_grad()
def compute_metrics(model, loader, device, num_classes, criterion=None, precision="fp32", on_prediction=None,
                    flip=False):
    """Metrics of model over loader (all-reduced under torchrun). Logits are resized to each mask's size (the image's
    original resolution unless --eval-size) before argmax; batches holding "views" (a dataset with scales) are
    evaluated at every scale, and with flip mirrored too (segment()). on_prediction(index, pred uint8 HxW) sees each
    image."""
    model.eval()
    confmat = common.ConfusionMatrix(num_classes)
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no sync per image
    for batch in batches(loader):
        masks = batch["mask"] if isinstance(batch["mask"], list) else list(batch["mask"])
        views = batch["views"] if "views" in batch else [batch["image"]]
        scores = segment(model, views, [m.shape[-2:] for m in masks], device, precision, flip)
        for j, (mask, up) in enumerate(zip(masks, scores)):
            mask = mask.to(device)
            pred = up.argmax(1)[0]
            confmat.update(mask, pred)
            if criterion is not None:  # an all-ignore mask has no loss (0/0); a diverged model's NaN stays NaN
                loss = criterion(up, mask[None]).double()
                loss_sum += torch.where((mask != common.IGNORE_INDEX).any(), loss, 0.0)
            n += 1
            if on_prediction is not None:
                on_prediction(int(batch["index"][j]), pred.to(torch.uint8).cpu().numpy())
    confmat.all_reduce()
    metrics = confmat.compute()
    loss_sum, n = all_reduce_sum([float(loss_sum), n], device)
    metrics.update(loss=loss_sum / max(n, 1), num_images=int(n), confusion=confmat.mat)
    return metrics


# ---------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EpochProgress:
    """Where a run stands inside an epoch; saved in last.pth when a run is stopped mid-epoch."""
    epoch: int
    step: int = 0             # batches done
    images: int = 0           # images whose loss counted (skipped steps excluded)
    seconds: float = 0.0
    wait: float = 0.0         # seconds spent waiting for the loader
    skipped: int = 0          # optimizer steps skipped for non-finite gradients (--skip-nonfinite)
    totals: dict = dataclasses.field(default_factory=dict)  # loss term -> sum over images


class DeviceSums:
    """Loss-term sums of an epoch kept on the device, so a step never waits for the GPU; read() syncs once."""

    def __init__(self, progress, device):
        self.device = device
        self.totals = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in progress.totals.items()}
        self.images = torch.tensor(progress.images, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(-1, device=device)  # first batch with a non-finite loss
        self.bad_terms = {}

    def add(self, step, loss, terms, batch_size):
        finite = torch.isfinite(loss).all()
        first_bad = ~finite & (self.first_bad < 0)  # the terms named are those of the first bad batch
        for k, v in {"loss": loss, **terms}.items():
            v = v.detach().double().sum()  # (a scalar; sum() also takes a one-element tensor)
            self.totals[k] = self.totals.get(k, 0) + torch.where(finite, v * batch_size, 0.0)
            self.bad_terms[k] = self.bad_terms.get(k, False) | (first_bad & ~torch.isfinite(v))
        self.images += finite * batch_size
        self.first_bad = torch.where(first_bad, step, self.first_bad)

    def read(self, progress):
        progress.totals = {k: float(v) for k, v in self.totals.items()}
        progress.images = int(self.images)
        return int(self.first_bad)


def train_one_epoch(net, compute_loss, loader, optimizer, scaler, progress, cfg, stop=None):
    """Train over loader, continuing progress. No host sync per batch: loss terms add up on the device and are read
    every cfg.log_every optimizer steps, where a non-finite loss and (under torchrun) a stop request are acted on.
    Returns True if the epoch ran to its end, False if a stop request ended it early."""
    net.train()
    stop = stop if stop is not None else StopRequest()  # (not installed: never set)
    sums, t0, end = DeviceSums(progress, cfg.device), time.perf_counter(), progress.step + len(loader)
    # a bar on a terminal only (sync_point prints plain lines to a redirected log); closed on any error, so an error
    # message starts on a line of its own
    with tqdm(total=end, initial=progress.step, desc=f"epoch {progress.epoch}", leave=False, dynamic_ncols=True,
              disable=None if is_main() else True) as bar:
        t_wait, steps = time.perf_counter(), 0
        for i, batch in enumerate(batches(loader), start=1):
            progress.wait += time.perf_counter() - t_wait
            batch = to_device(batch, cfg)
            step_now = i % cfg.accumulate == 0 or i == len(loader)
            with contextlib.nullcontext() if step_now or not is_distributed() else net.no_sync():
                with autocast(cfg.device, cfg.precision):
                    loss, terms = compute_loss(net, batch)
                ((scaler.scale(loss) if scaler is not None else loss) / cfg.accumulate).backward()
            sums.add(progress.step, loss, terms, batch["image"].shape[0])
            progress.step += 1
            bar.update()
            if step_now:
                steps += 1
                progress.skipped += optimizer_step(net, optimizer, scaler, cfg.skip_nonfinite)
                if steps % cfg.log_every == 0 or i == len(loader) or (stop.signal and not is_distributed()):
                    if sync_point(sums, progress, bar, stop, cfg, t0):
                        break
            t_wait = time.perf_counter()
    progress.seconds += time.perf_counter() - t0
    sums.read(progress)
    return progress.step == end


def to_device(batch, cfg):
    """The batch's tensors on the training device, its image in the training memory format."""
    batch = {k: v.to(cfg.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if cfg.channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def optimizer_step(net, optimizer, scaler, skip_nonfinite):
    """One optimizer step (through the scaler for fp16); with skip_nonfinite, a step whose gradients (the same on
    every rank after DDP's all-reduce) are not finite is skipped. Returns 1 if skipped, else 0."""
    skipped = 0
    if skip_nonfinite and scaler is None:  # (the fp16 scaler skips such steps by itself)
        params = [p for p in net.parameters() if p.grad is not None]
        skipped = int(not torch.isfinite(nn.utils.clip_grad_norm_(params, float("inf"))))  # a sync: only with the flag
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


def sync_point(sums, progress, bar, stop, cfg, t0):
    """Read the device sums: stop the run on a non-finite loss (unless --skip-nonfinite), show the running loss.
    Returns True if every rank is to stop after this step (a SIGINT/SIGTERM on any of them)."""
    first_bad = sums.read(progress)
    bad, stopping = all_reduce_sum([first_bad >= 0, stop.signal is not None], cfg.device)
    stop.agreed = stopping > 0
    if bad and not cfg.skip_nonfinite:
        terms = ", ".join(k for k, v in sums.bad_terms.items() if k != "loss" and bool(v)) or "total"
        where = f"batch {first_bad}" if first_bad >= 0 else "a batch of another process"
        raise errors.UserError(f"non-finite loss at epoch {progress.epoch} {where} (terms: {terms}); "
                               f"{restart_advice(cfg.out_dir, skip_nonfinite=True)}")
    if bad and first_bad >= 0:
        warnings.warn(f"epoch {progress.epoch}: non-finite loss at batch {first_bad}; its optimizer step is skipped "
                      f"(--skip-nonfinite)")
        sums.first_bad.fill_(-1)
        sums.bad_terms = {}
    loss, img_s = progress.totals.get("loss", 0.0) / max(progress.images, 1), progress.images / max(
        progress.seconds + time.perf_counter() - t0, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.1f}")
    if bar.disable and is_main():  # output redirected to a file: a plain line instead of the bar
        print(f"epoch {progress.epoch} batch {progress.step}/{bar.total} | loss {loss:.4f} | {img_s:.1f} img/s",
              flush=True)
    return stop.agreed


def epoch_stats(progress, device):
    """The train_* entries of an epoch's history record, loss terms summed over all ranks."""
    keys = sorted(progress.totals)
    summed = all_reduce_sum([progress.totals[k] for k in keys] + [progress.images], device)
    n, seconds = max(summed[-1], 1), max(progress.seconds, 1e-9)
    stats = {("train_loss" if k == "loss" else f"train_loss_{k}"): v / n for k, v in zip(keys, summed)}
    stats.update(train_s=seconds, train_img_s=summed[-1] / seconds, data_wait_frac=progress.wait / seconds,
                 skipped_steps=progress.skipped)
    return stats


# ---------------------------------------------------------------------------------------------
# Checkpoints: one function writes the dict, one restores it
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunState:
    """What a run carries from epoch to epoch."""
    epoch: int = 0                    # the next epoch to run
    best_miou: float | None = None
    history: list = dataclasses.field(default_factory=list)
    partial: EpochProgress | None = None  # a half-done epoch (after a stop request)


def make_checkpoint(model, adapters, optimizer, scheduler, scaler, state, cfg, arch):
    """The checkpoint dict: tensors and plain Python types only, so it loads with torch.load(weights_only=True)."""
    return {"model": model.state_dict(), "adapters": adapters.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch - 1, "best_miou": state.best_miou, "history": state.history,
            "partial": dataclasses.asdict(state.partial) if state.partial is not None else None,
            "args": cfg.flags, "arch": arch, "num_classes": cfg.data.num_classes, "metric_unit": "percent",
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(cfg.device) if cfg.device.type == "cuda" else None}}


def weights_checkpoint(ckpt):
    """best.pth / epoch_NNN.pth: the deployable weights and what describes them, without the optimizer state
    (a student's is 2x its weights, a teacher's 2x 130 MB); only last.pth keeps everything for --resume."""
    return {k: ckpt[k] for k in ("model", "epoch", "best_miou", "history", "args", "arch", "num_classes",
                                 "metric_unit")}


# flags that do not change the experiment (how it runs, not what it computes) may differ on --resume; so may paths
# whose content is recorded (teacher_file) or no longer read (init_weights: the checkpoint holds the weights)
RESUME_MAY_CHANGE = {"workers", "device", "out_dir", "resume", "log_every", "save_every", "epochs", "cache_dir",
                     "skip_nonfinite", "channels_last", "data_dir", "teacher_weights", "init_weights", "data_on_device", "data_path", "data_bytes",
                     "compile"}


def check_same_experiment(saved, current, path, what="--resume", advice="resume with the same flags or start a new "
                          "--out-dir"):
    """--resume must continue the same experiment: one line listing every flag that differs (a flag recorded under
    its old name, flags.RENAMED, is compared under its new one)."""
    saved = {flags.RENAMED.get(k, k): v for k, v in saved.items()}
    diffs = [f"--teacher-weights: another file (crc32 {saved[k]['crc32']} -> {current[k]['crc32']})"
             if k == "teacher_file" and saved[k] and current[k] else f"--{k.replace('_', '-')} {saved[k]} -> {current[k]}"
             for k in sorted(current) if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != current[k]]
    if diffs:
        raise errors.UserError(f"{what} {path} was trained with other settings ({'; '.join(diffs)}); {advice}")


def restore_checkpoint(path, model, adapters, optimizer, scheduler, scaler, cfg, arch):
    """Put back everything make_checkpoint() saved; returns the RunState to continue from."""
    ckpt = common.read_checkpoint(path, "--resume")
    missing = [k for k in ("optimizer", "scheduler", "rng", "epoch") if k not in ckpt]
    if missing:
        raise errors.UserError(f"--resume {path} holds weights only, no training state ({', '.join(missing)}), so no "
                               f"run can continue from it; start a new run from its weights with --init-weights {path} "
                               f"and another --out-dir")
    for key, have in (("arch", arch), ("num_classes", cfg.data.num_classes), ("strategy", cfg.strategy)):
        was = ckpt.get(key) if key != "strategy" else ckpt.get("args", {}).get("strategy")
        if was != have:
            raise errors.UserError(f"--resume {path} is a run with {key}={was}, this one has {key}={have}; "
                                   f"resume with the same flags or start a new --out-dir")
    check_same_experiment(ckpt.get("args", {}), cfg.flags, path)
    model.load_state_dict(ckpt["model"])
    adapters.load_state_dict(ckpt["adapters"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if cfg.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], cfg.device)
    partial = EpochProgress(**ckpt["partial"]) if ckpt.get("partial") else None
    if partial is not None and not is_main():  # the saved sums are rank 0's; each rank adds its own from here
        partial = dataclasses.replace(partial, totals={}, images=0, wait=0.0)
    state = RunState(ckpt["epoch"] + 1, *history_in_percent(ckpt), partial)
    best = "none yet" if state.best_miou is None else f"{state.best_miou:.2f}"
    log(f"resumed {path} at epoch {state.epoch}" + (f" batch {partial.step}" if partial else "")
        + f" (best mIoU {best})")
    return state


PERCENT_KEYS = ("val_miou", "val_pixel_acc", "val_mean_class_acc")


def history_in_percent(ckpt):
    """(best_miou, history) of a checkpoint in percent: checkpoints written before every figure became a percentage
    (no "metric_unit") hold fractions, converted here so that a resumed run's history stays in one unit."""
    if ckpt.get("metric_unit") == "percent":
        return ckpt["best_miou"], ckpt["history"]
    history = [{k: 100 * v if k in PERCENT_KEYS else v for k, v in record.items()} for record in ckpt["history"]]
    return (None if ckpt["best_miou"] is None else 100 * ckpt["best_miou"]), history


HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_miou", "val_pixel_acc", "epoch_s")


def read_history(path):
    """A run's history.json: a list of epoch records, each with HISTORY_KEYS as numbers; anything else (truncated,
    not JSON, edited) raises UserError naming the file."""
    try:
        history = fileio.read_json(path)
    except ValueError as e:
        raise errors.UserError(str(e)) from None
    for record in history if isinstance(history, list) else [None]:
        missing = [k for k in HISTORY_KEYS if not isinstance(record, dict) or not isinstance(record.get(k), (int, float))]
        if missing:
            where = f"epoch record {record.get('epoch', '?')}" if isinstance(record, dict) else "its content"
            raise errors.UserError(f"{path} is not a run's history ({where} lacks {', '.join(missing)}); it was "
                                   f"damaged or edited: delete the run's folder to train it again")
    return history


def save_checkpoint(obj, path):
    fileio.atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class TrainModule(nn.Module):
    """The network and its training-only modules (feature-KD adapters) as one module, so DDP averages every
    trainable parameter's gradient; calling it calls the network (keyword arguments pass through)."""

    def __init__(self, model, adapters):
        super().__init__()
        self.model, self.adapters = model, adapters

    def forward(self, x, **kwargs):
        return self.model(x, **kwargs)


def train(model, compute_loss, datasets, criterion, cfg, adapters=None):
    """Train model (student or teacher) with compute_loss(net, batch) -> (loss, {term: value}); adapters train with
    it and are saved beside it. Returns the history."""
    arch = "teacher" if isinstance(model, common.Teacher) else "student"
    adapters = adapters if adapters is not None else nn.ModuleDict()
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    adapters.to(cfg.device)
    params = [p for p in list(model.parameters()) + list(adapters.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler(cfg.device.type) if cfg.precision == "fp16" else None  # bf16 has fp32's range
    state = RunState()
    if cfg.resume:
        state = restore_checkpoint(cfg.resume, model, adapters, optimizer, scheduler, scaler, cfg, arch)
    net = TrainModule(model, adapters)
    if is_distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[cfg.device] if cfg.device.type == "cuda" else None)
    if cfg.compile:  # the step, not the model: checkpoints keep the plain module's names
        compute_loss = torch.compile(compute_loss)
    val_loader = make_loader(datasets["val"], cfg.batch_size, cfg.data.workers, persistent=True,
                             pin_memory=cfg.device.type == "cuda")
    train_batches = TrainBatches(datasets["train"], cfg)
    cfg = dataclasses.replace(cfg, flags=dict(cfg.flags, data_path="device" if train_batches.on_device else "loader",
                                              data_bytes=train_batches.nbytes))  # recorded in config.json
    log(f"{arch}: {common.count_params(model):,} parameters | train {len(datasets['train'])} val "
        f"{len(datasets['val'])} images | device {cfg.device} x {world_size()} process(es) | precision {cfg.precision} "
        f"| out {cfg.out_dir}")
    save = (model, adapters, optimizer, scheduler, scaler)
    with run_folder(cfg), StopRequest() as stop, contextlib.closing(train_batches), \
            contextlib.ExitStack() as cleanup:
        cleanup.callback(close_loader, val_loader)
        for epoch in range(state.epoch, cfg.epochs):
            t0 = time.perf_counter()
            progress = state.partial if state.partial is not None else EpochProgress(epoch)
            loader = train_batches.for_epoch(epoch, skip_batches=progress.step)
            seconds_before = progress.seconds
            if not train_one_epoch(net, compute_loss, loader, optimizer, scaler, progress, cfg, stop):
                state.partial = progress  # stopped inside the epoch: save exactly where we are
                finish_interrupted(save, state, cfg, arch, stop, f"at epoch {epoch} batch {progress.step}")
            broadcast_buffers(model)
            metrics = compute_metrics(model, val_loader, cfg.device, cfg.data.num_classes, criterion, cfg.precision)
            check_not_diverged(model, metrics, epoch, cfg.out_dir)
            scheduler.step(metrics["miou"])
            record = {"epoch": epoch, **epoch_stats(progress, cfg.device), "val_loss": metrics["loss"],
                      "val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"],
                      "val_mean_class_acc": metrics["mean_class_acc"],
                      "val_classes_predicted": metrics["classes_predicted"], "lr": optimizer.param_groups[0]["lr"],
                      "epoch_s": seconds_before + time.perf_counter() - t0}
            with stop.saving():
                end_epoch(save, state, record, cfg, arch)
            if stop.agreed or (stop.signal and not is_distributed()):
                finish_interrupted(save, state, cfg, arch, stop, f"after epoch {epoch}", saved=True)
    best = "none" if state.best_miou is None else f"{state.best_miou:.2f}"
    log(f"done: best val mIoU {best} -> {os.path.join(cfg.out_dir, 'best.pth')}")
    if is_distributed():
        torch.distributed.barrier()  # nobody leaves before rank 0 has written the last files
    return state.history


def check_not_diverged(model, metrics, epoch, out_dir):
    """A NaN/inf val loss or weight stops the run before anything is saved: a diverged model (whose NaN logits
    would argmax to background and score a plausible mIoU) never becomes best.pth."""
    finite_weights = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if not (math.isfinite(metrics["loss"]) and finite_weights):
        what = f"val loss {metrics['loss']}" if finite_weights else "non-finite weights"
        raise errors.UserError(f"the model diverged at epoch {epoch} ({what}); nothing of this epoch was saved. "
                               f"{restart_advice(out_dir)}")


def restart_advice(out_dir, skip_nonfinite=False):
    """What to run after a run stopped for a NaN/inf: only commands this repo accepts, with files that exist."""
    last, best = os.path.join(out_dir, "last.pth"), os.path.join(out_dir, "best.pth")
    options = []
    if skip_nonfinite and os.path.isfile(last):
        options.append(f"continue from {last} skipping such steps: the same command plus --resume --skip-nonfinite")
    fresh = "start a new run (another --out-dir) with a lower --lr"
    options.append(fresh + (f", from the last good weights with --init-weights {best}" if os.path.isfile(best) else ""))
    return "; or ".join(options) + " (and check the data)"


@contextlib.contextmanager
def run_folder(cfg):
    """Create the run folder and hold its lock for the run's lifetime (rank 0); write config.json on a fresh run (a
    resumed one has the same experiment flags, checked, so its config.json stands)."""
    if not is_main():
        yield
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    with run_lock(cfg.out_dir):
        if not cfg.resume:
            fileio.write_json(os.path.join(cfg.out_dir, "config.json"), cfg.flags)
        yield


@contextlib.contextmanager
def run_lock(out_dir):
    """OUT_DIR/run.lock holds this process's pid while it runs: a second run on the same folder stops with one line
    naming the holder, instead of mixing its checkpoints and history with ours. A lock whose process is gone (kill -9,
    power loss) does not block."""
    path, tmp = os.path.join(out_dir, "run.lock"), os.path.join(out_dir, f"run.lock.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    try:
        while True:
            try:
                os.link(tmp, path)  # atomic: exactly one process creates the lock, already holding its pid
                break
            except FileExistsError:
                holder = lock_holder(path)
                if holder is not None:
                    raise errors.UserError(f"--out-dir {out_dir} is in use by another run (pid {holder}, {path}); "
                                           f"wait for it to finish or choose another --out-dir")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # stale: its process is gone
    finally:
        os.remove(tmp)
    try:
        yield
    finally:
        if lock_holder(path) == os.getpid():
            os.remove(path)


def lock_holder(path):
    """The pid in a lock file if that process is alive, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError) as e:
        return pid if isinstance(e, PermissionError) else None
    return pid


def end_epoch(save, state, record, cfg, arch):
    """Add the epoch to the history; rank 0 writes last.pth (and best/periodic copies), history.json and plots."""
    state.history.append(record)
    state.epoch, state.partial = record["epoch"] + 1, None
    is_best = state.best_miou is None or record["val_miou"] > state.best_miou
    if is_best:
        state.best_miou = record["val_miou"]
    if not is_main():  # only rank 0 writes; the others hold the same weights
        return
    ckpt = make_checkpoint(*save, state, cfg, arch)
    save_checkpoint(ckpt, os.path.join(cfg.out_dir, "last.pth"))
    if state.epoch % cfg.save_every == 0:
        save_checkpoint(weights_checkpoint(ckpt), os.path.join(cfg.out_dir, f"epoch_{state.epoch:03d}.pth"))
    if is_best:
        save_checkpoint(weights_checkpoint(ckpt), os.path.join(cfg.out_dir, "best.pth"))
    fileio.write_json(os.path.join(cfg.out_dir, "history.json"), state.history)
    with open(os.path.join(cfg.out_dir, "history.json")) as f:
        plots.plot_history(json.load(f), cfg.out_dir)
    print(format_epoch(record), flush=True)


def finish_interrupted(save, state, cfg, arch, stop, where, saved=False):
    """Save a resumable checkpoint (unless the epoch's end just did) and exit naming how to continue."""
    last = os.path.join(cfg.out_dir, "last.pth")
    if is_main() and not saved:
        with stop.saving():
            save_checkpoint(make_checkpoint(*save, state, cfg, arch), last)
    raise errors.Interrupted(f"interrupted by {stop.signal}: saved {last} {where}; continue with the same command "
                             f"plus --resume", stop.signal)


def format_epoch(rec):
    parts = " ".join(f"{k[len('train_loss_'):]} {v:.4f}" for k, v in rec.items() if k.startswith("train_loss_"))
    return (f"epoch {rec['epoch']:3d} | train loss {rec['train_loss']:.4f} ({parts}) | val loss {rec['val_loss']:.4f} "
            f"mIoU {rec['val_miou']:.2f} pixel acc {rec['val_pixel_acc']:.2f} | lr {rec['lr']:.2e} | "
            f"{rec['epoch_s']:.1f}s {rec['train_img_s']:.1f} img/s data wait {100 * rec['data_wait_frac']:.0f}%"
            + (" | predicts one class everywhere on val" if rec.get("val_classes_predicted") == 1 else ""))


class StopRequest:
    """SIGINT/SIGTERM while training: the first lets the loop finish its batch, save a resumable checkpoint and exit.
    A repeat within REPEAT_WINDOW_S of the first is the same request (a launcher such as `timeout` or srun forwards
    the signal the whole process group already got) and, like any signal while a checkpoint is being written, does
    not abandon the save; a deliberate later repeat exits at once, leaving the last complete checkpoint intact (they
    are written atomically)."""

    REPEAT_WINDOW_S = 3.0

    def __init__(self):
        self.signal, self._previous = None, {}
        self.agreed = False  # every process knows of a stop request (set where the loop syncs)
        self._first_at, self._saving = None, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = name, now
            print(f"\n{name}: saving a resumable checkpoint after this batch (a repeat more than "
                  f"{self.REPEAT_WINDOW_S:g} s later exits at once)", file=sys.stderr, flush=True)
        elif self._saving or now - self._first_at < self.REPEAT_WINDOW_S:
            print(f"\n{name} again {now - self._first_at:.1f} s after the first: "
                  f"{'writing the checkpoint' if self._saving else 'the same request'}, still saving",
                  file=sys.stderr, flush=True)
        else:
            print(f"\n{name} again: exiting now; the last complete checkpoint is kept", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    @contextlib.contextmanager
    def saving(self):
        """No signal abandons what is written inside this block."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
