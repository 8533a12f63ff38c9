"""Training throughput of the real recipe (student at 256 x 256, batch 16) on real-size epochs (VOC train's 1,464
images; a smaller set is repeated): per method and per data path (--data-on-device on/off), train img/s, data-wait
fraction and peak device memory of whole epochs of the real loop (the logit methods read the teacher-logit cache, the
feature methods run the teacher live), optionally compiled; the cache build's img/s, and the loader alone. Random
weights (the speed is the same), the toy set or VOC; the last line of stdout is one JSON document.

    python bench_throughput.py --toy --amp --workers 8 --json bench.json            # the GPU recipe, both paths
    python bench_throughput.py --toy --amp --workers 8 --batch-size 64 --compile both --strategies baseline
    python bench_throughput.py --toy --epoch-images 64 --strategies baseline         # a quick look on a CPU
    python bench_throughput.py --toy --memory-format both                # channels_last vs contiguous, in turns
"""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time

import torch
import torch.nn as nn

import common
import device_data
import distill
import engine
import errors
import fileio
import flags
import methods
from distributed import init_distributed

STRATEGIES = tuple(methods.registry())


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Training throughput of each strategy on each data path, the cache build and the loader.")
    flags.add_data_args(parser, "deployment")  # the real recipe's size, also on the toy set
    parser.add_argument("--batch-size", type=flags.positive_int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--epoch-images", type=flags.positive_int, default=1464,
                        help="images of each timed epoch, VOC train's count: a training set with fewer is repeated "
                             "to this size, so the figures are those of real epochs (default: %(default)s)")
    parser.add_argument("--warmup", type=flags.non_negative_int, default=3,
                        help="untimed steps before each timed epoch (workers starting, allocator, cuDNN autotuning, "
                             "compilation) (default: %(default)s)")
    parser.add_argument("--rounds", type=flags.positive_int, default=1,
                        help="timed epochs per strategy, taken in rounds in which every strategy runs one in turn, so "
                             "a machine whose speed drifts slows all alike (default: %(default)s)")
    engine.add_amp_arg(parser)
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous", "both"), default="channels_last",
                        help="layout of the training step; both: each strategy in both layouts (default: %(default)s)")
    parser.add_argument("--data-on-device", choices=device_data.MODES + ("both",), default="both",
                        help="the data path (train_*.py --data-on-device); both: each strategy on each path "
                             "(default: %(default)s)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile the training step (train_*.py --compile); both: each strategy eager and "
                             "compiled (default: %(default)s)")
    parser.add_argument("--strategies", default="all", type=flags.name_list(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)}, or all (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH")
    return parser


def loader_throughput(dataset, batch_size, workers):
    """img/s of the training loader alone over one epoch (decode from the pixel cache, augmentation warp, collate)."""
    loader = engine.make_loader(dataset, batch_size, workers, shuffle=True, generator=torch.Generator().manual_seed(0))
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


class Take:
    """The first n batches of a loader, with a length (train_one_epoch's progress bar needs one)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self):
        return self.n

    def __iter__(self):
        return (batch for _, batch in zip(range(self.n), self.loader))


class Trainee:
    """One strategy's student, optimizer and loss on one data path; epoch() trains one timed epoch of the real loop
    (engine.TrainBatches, engine.train_one_epoch) after `warmup` untimed steps and adds it to `timed`."""

    def __init__(self, model, compute_loss, cfg, logits, adapters=None):
        adapters = adapters if adapters is not None else nn.ModuleDict()
        model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        self.net = engine.TrainModule(model, adapters.to(cfg.device))
        self.optimizer = torch.optim.Adam(list(model.parameters()) + list(adapters.parameters()), lr=1e-4)
        self.scaler = torch.amp.GradScaler(cfg.device.type) if cfg.precision == "fp16" else None
        self.compute_loss = torch.compile(compute_loss) if cfg.compile else compute_loss
        self.cfg, self.logits = cfg, logits
        self.timed, self.peak_bytes = engine.EpochProgress(1), 0

    def epoch(self, dataset, warmup, round_):
        dataset.teacher_logits = self.logits  # before the loader's workers start (they copy the dataset)
        cuda = self.cfg.device.type == "cuda"
        with contextlib.closing(engine.TrainBatches(dataset, self.cfg)) as batches:
            if warmup:
                self.train(Take(batches.for_epoch(2 * round_), warmup), engine.EpochProgress(0))
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.cfg.device)
            self.train(batches.for_epoch(2 * round_ + 1), self.timed)
            if cuda:
                self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.cfg.device))

    def train(self, loader, progress):
        engine.train_one_epoch(self.net, self.compute_loss, loader, self.optimizer, self.scaler, progress, self.cfg)
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize()


def train_in_turns(trainees, dataset, warmup, rounds):
    """{key: (img/s, data-wait fraction)} of `rounds` timed epochs per trainee, each after `warmup` untimed steps,
    taken in rounds in which every trainee trains one epoch in turn: a machine whose speed drifts (a shared CPU, a GPU
    warming up) slows every strategy alike, so their ratios hold; each epoch runs whole, so a loader's workers never
    get ahead while another trainee trains."""
    for r in range(rounds):
        for trainee in trainees.values():
            trainee.epoch(dataset, warmup, r)
    return {key: (t.timed.images / t.timed.seconds, t.timed.wait / t.timed.seconds) for key, t in trainees.items()}


def strategy_loss(method, criterion, teacher, teacher_dtype):
    """A method's loss with its defaults, as its script builds it: the logit methods read the teacher-logit cache
    (teacher None), the feature methods run the teacher live."""
    defaults = methods.get_args_parser(method).parse_args([])
    live = teacher if method.TEACHER == "features" else None
    return method.build_loss(defaults, methods.Context(criterion, live, teacher_dtype))


def epoch_sized(dataset, images):
    """The training set repeated (or cut) to `images` items: a real-size epoch from a small set."""
    dataset.indices = [dataset.indices[k % len(dataset.indices)] for k in range(images)]
    return dataset


def variants(args):
    """(key suffix, layout, data path, compile) of every setting each strategy is timed in."""
    both = {"memory_format": ("channels_last", "contiguous"), "data_on_device": ("on", "off"), "compile": ("off", "on")}
    chosen = {name: both[name] if getattr(args, name) == "both" else (getattr(args, name),) for name in both}
    out = []
    for layout in chosen["memory_format"]:
        for path in chosen["data_on_device"]:
            for comp in chosen["compile"]:
                words = ([layout] if len(chosen["memory_format"]) > 1 else []) + (
                    [f"device-data {path}"] if len(chosen["data_on_device"]) > 1 else []) + (
                    ["compiled" if comp == "on" else "eager"] if len(chosen["compile"]) > 1 else [])
                out.append((" ".join(words), layout, path, comp == "on"))
    return out


def main(args):
    if args.cache_dir:
        raise errors.UserError("--cache-dir: the benchmark builds its caches in a temporary folder, so that the "
                               "teacher-logit cache build is timed; drop the flag")
    if args.json:
        fileio.check_output_file(args.json, "--json")
    device = init_distributed(args.device)
    precision, teacher_dtype = engine.resolve_amp(args.amp, device), distill.resolve_teacher_dtype(None, device)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache folder: the teacher-logit cache is built, and timed
        data = dataclasses.replace(common.data_config(args), cache_dir=tmp)
        dataset = epoch_sized(common.build_datasets(data, splits=("train",))["train"], args.epoch_images)
        if args.epoch_images < args.batch_size:
            raise errors.UserError(f"--epoch-images {args.epoch_images} is less than one --batch-size "
                                   f"({args.batch_size}); raise it")
        criterion = nn.CrossEntropyLoss(ignore_index=common.IGNORE_INDEX)
        teacher = common.build_teacher(data.num_classes, pretrained=False).eval().requires_grad_(False)
        teacher.to(device, memory_format=torch.channels_last)
        result = {"device": describe(device), "torch": torch.__version__, "image_size": data.image_size,
                  "batch_size": args.batch_size, "precision": precision, "teacher_dtype": teacher_dtype,
                  "workers": data.workers, "epoch_images": len(dataset), "warmup": args.warmup,
                  "loader_img_s": loader_throughput(dataset, args.batch_size, data.workers), "train": {}}
        print(f"loader alone: {result['loader_img_s']:.1f} img/s ({data.workers} workers)", flush=True)
        strategies, cache = [methods.registry()[name] for name in args.strategies], None
        if any(method.TEACHER == "logits" for method in strategies):
            cache = distill.TeacherLogitCache(teacher, dataset, device, args.batch_size, data.workers, teacher_dtype)
            result["teacher_cache_build_img_s"] = len(dataset) / cache.build_s
            print(f"teacher-logit cache build: {result['teacher_cache_build_img_s']:.1f} img/s", flush=True)
        trainees = {}
        for method in strategies:
            for suffix, layout, path, compiled in variants(args):
                cfg = bench_config(device, data, args.batch_size, precision, layout == "channels_last", path, compiled)
                torch.manual_seed(0)
                student = common.build_student(data.num_classes, pretrained=False)
                loss = strategy_loss(method, criterion.to(device), teacher, teacher_dtype)
                trainees[f"{method.NAME} {suffix}".strip()] = Trainee(
                    student, loss.compute_loss, cfg, cache if method.TEACHER == "logits" else None, loss.modules)
        for key, (img_s, wait) in train_in_turns(trainees, dataset, args.warmup, args.rounds).items():
            peak = trainees[key].peak_bytes / 2 ** 20 if device.type == "cuda" else None
            result["train"][key] = {"img_s": img_s, "data_wait_frac": wait, "peak_memory_mb": peak}
            print(f"{key:>40s}: {img_s:8.1f} img/s, data wait {100 * wait:4.1f}%"
                  + (f", peak memory {peak:.0f} MB" if peak is not None else ""), flush=True)
        result["rounds"] = args.rounds
    if args.json:
        fileio.write_json(args.json, result)
    print(json.dumps(result, separators=(",", ":")))
    return result


def bench_config(device, data, batch_size, precision, channels_last, data_on_device, compiled):
    """A TrainConfig for timing steps: no sync points inside the timed steps but the last."""
    return engine.TrainConfig(strategy="bench", device=device, data=data, out_dir="", resume=None, epochs=1,
                              batch_size=batch_size, lr=1e-4, weight_decay=0.0, lr_factor=0.5, lr_patience=5,
                              save_every=1, precision=precision, accumulate=1, channels_last=channels_last,
                              data_on_device=data_on_device, compile=compiled,
                              sync_bn=False, skip_nonfinite=False, log_every=10 ** 9, flags={})


def describe(device):
    """The machine in words, for the figures: GPU name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):  # Linux: the model name ("AMD EPYC 9B14", "Intel Xeon ...")
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"CPU {name}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
