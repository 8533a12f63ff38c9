"""Training throughput of the real recipe (student at 256 x 256, batch 16): train img/s and data-wait fraction of
every method (the logit methods read the teacher-logit cache, the feature methods run the teacher live), the cache
build's img/s, and the loader alone. Random weights (the speed is the same), the toy set or VOC; the last line of
stdout is one JSON document.

    python bench_throughput.py --toy                                   # CUDA if available, else CPU (slow: minutes)
    python bench_throughput.py --toy --amp --workers 8 --json bench.json          # the GPU recipe
    python bench_throughput.py --toy --image-size 64 --batch-size 4 --steps 3     # a quick look on a CPU
    python bench_throughput.py --toy --memory-format both                # channels_last vs contiguous, in turns
"""
import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

import torch
import torch.nn as nn

import common
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
        description="Training throughput of each strategy, the cache build and the loader.")
    flags.add_data_args(parser, "deployment")  # the real recipe's size, also on the toy set
    parser.add_argument("--batch-size", type=flags.positive_int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--steps", type=flags.positive_int, default=20,
                        help="timed training steps per strategy, after --warmup (default: %(default)s)")
    parser.add_argument("--warmup", type=flags.non_negative_int, default=3,
                        help="untimed steps first (allocator, cuDNN autotuning) (default: %(default)s)")
    parser.add_argument("--rounds", type=flags.positive_int, default=5,
                        help="the timed steps are taken in this many rounds, every strategy its share in turn, so a "
                             "machine whose speed drifts slows all alike (default: %(default)s)")
    engine.add_amp_arg(parser)
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous", "both"), default="channels_last",
                        help="layout of the training step; both: each strategy in both layouts (default: %(default)s)")
    parser.add_argument("--strategies", default="all", type=flags.name_list(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)}, or all (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH")
    return parser


def loader_throughput(dataset, batch_size, workers, batches):
    """img/s of the training loader alone (decode from the pixel cache, augmentation warp, collate)."""
    loader = engine.make_loader(dataset, batch_size, workers, shuffle=True, generator=torch.Generator().manual_seed(0))
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += batch["image"].shape[0]
        if i + 1 == batches:
            break
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
    """One strategy's student, optimizer and loss, trained a few engine.train_one_epoch steps at a time, in turns with
    the other strategies; `timed` adds up the timed steps' images, seconds and data wait."""

    def __init__(self, model, compute_loss, cfg, logits, adapters=None):
        adapters = adapters if adapters is not None else nn.ModuleDict()
        model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        self.net = engine.TrainModule(model, adapters.to(cfg.device))
        self.optimizer = torch.optim.Adam(list(model.parameters()) + list(adapters.parameters()), lr=1e-4)
        self.scaler = torch.amp.GradScaler(cfg.device.type) if cfg.precision == "fp16" else None
        self.compute_loss, self.cfg, self.logits = compute_loss, cfg, logits
        self.timed = engine.EpochProgress(1)

    def train(self, dataset, batches, seed, progress):
        dataset.teacher_logits = self.logits  # (the loader's workers copy the dataset when they start)
        loader = engine.make_loader(dataset, self.cfg.batch_size, self.cfg.data.workers, shuffle=True,
                                    generator=torch.Generator().manual_seed(seed))
        engine.train_one_epoch(self.net, self.compute_loss, Take(loader, batches), self.optimizer, self.scaler,
                               progress, self.cfg)
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize()


def train_in_turns(trainees, dataset, warmup, steps, rounds):
    """{key: (img/s, data-wait fraction)} of `steps` timed steps per trainee, after `warmup` untimed ones, taken in
    `rounds` rounds in which every trainee trains its share in turn: a machine whose speed drifts (a shared CPU, a
    GPU warming up) slows every strategy alike, so their ratios hold."""
    for trainee in trainees.values():
        if warmup:
            trainee.train(dataset, warmup, 0, engine.EpochProgress(0))
    for r in range(rounds):
        share = steps // rounds + (r < steps % rounds)
        for trainee in trainees.values():
            trainee.train(dataset, share, r + 1, trainee.timed)
    return {key: (t.timed.images / t.timed.seconds, t.timed.wait / t.timed.seconds) for key, t in trainees.items()}


def strategy_loss(method, criterion, teacher, teacher_dtype):
    """A method's loss with its defaults, as its script builds it: the logit methods read the teacher-logit cache
    (teacher None), the feature methods run the teacher live."""
    defaults = methods.get_args_parser(method).parse_args([])
    live = teacher if method.TEACHER == "features" else None
    return method.build_loss(defaults, methods.Context(criterion, live, teacher_dtype))


def main(args):
    if args.cache_dir:
        raise errors.UserError("--cache-dir: the benchmark builds its caches in a temporary folder, so that the "
                               "teacher-logit cache build is timed; drop the flag")
    if args.json:
        fileio.check_output_file(args.json, "--json")
    device = init_distributed(args.device)
    precision, teacher_dtype = engine.resolve_amp(args.amp, device), distill.resolve_teacher_dtype(None, device)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache folder: the teacher-logit cache is built, and timed
        data = common.data_config(args)
        needed = (args.warmup + args.steps) * args.batch_size
        data = dataclasses.replace(data, cache_dir=tmp, limit_train=min(needed, data.limit_train or needed))
        dataset = common.build_datasets(data, splits=("train",))["train"]
        if len(dataset) < needed:
            raise errors.UserError(f"the training set has {len(dataset)} images, --warmup + --steps need "
                                   f"{needed} at --batch-size {args.batch_size}; lower --steps")
        criterion = nn.CrossEntropyLoss(ignore_index=common.IGNORE_INDEX)
        teacher = common.build_teacher(data.num_classes, pretrained=False).eval().requires_grad_(False)
        teacher.to(device, memory_format=torch.channels_last)
        result = {"device": describe(device), "torch": torch.__version__, "image_size": data.image_size,
                  "batch_size": args.batch_size, "precision": precision, "teacher_dtype": teacher_dtype,
                  "workers": data.workers, "steps": args.steps,
                  "loader_img_s": loader_throughput(dataset, args.batch_size, data.workers, args.steps), "train": {}}
        print(f"loader alone: {result['loader_img_s']:.1f} img/s ({data.workers} workers)", flush=True)
        strategies, cache = [methods.registry()[name] for name in args.strategies], None
        if any(method.TEACHER == "logits" for method in strategies):
            cache = distill.TeacherLogitCache(teacher, dataset, device, args.batch_size, data.workers, teacher_dtype)
            result["teacher_cache_build_img_s"] = len(dataset) / cache.build_s
            print(f"teacher-logit cache build: {result['teacher_cache_build_img_s']:.1f} img/s", flush=True)
        layouts = ("channels_last", "contiguous") if args.memory_format == "both" else (args.memory_format,)
        trainees = {}
        for method in strategies:
            for layout in layouts:
                cfg = bench_config(device, data, args.batch_size, precision, layout == "channels_last")
                torch.manual_seed(0)
                student = common.build_student(data.num_classes, pretrained=False)
                loss = strategy_loss(method, criterion.to(device), teacher, teacher_dtype)
                key = method.NAME if len(layouts) == 1 else f"{method.NAME} {layout}"
                trainees[key] = Trainee(student, loss.compute_loss, cfg,
                                        cache if method.TEACHER == "logits" else None, loss.modules)
        rounds = min(args.rounds, args.steps)
        for key, (img_s, wait) in train_in_turns(trainees, dataset, args.warmup, args.steps, rounds).items():
            result["train"][key] = {"img_s": img_s, "data_wait_frac": wait}
            print(f"{key:>28s}: {img_s:8.1f} img/s, data wait {100 * wait:4.1f}%", flush=True)
        result["rounds"] = rounds
    if args.json:
        fileio.write_json(args.json, result)
    print(json.dumps(result, separators=(",", ":")))
    return result


def bench_config(device, data, batch_size, precision, channels_last):
    """A TrainConfig for timing steps: no sync points inside the timed steps but the last."""
    return engine.TrainConfig(strategy="bench", device=device, data=data, out_dir="", resume=None, epochs=1,
                              batch_size=batch_size, lr=1e-4, weight_decay=0.0, lr_factor=0.5, lr_patience=5,
                              save_every=1, precision=precision, accumulate=1, channels_last=channels_last, data_on_device="off",
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
