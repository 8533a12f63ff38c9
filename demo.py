"""The whole story on the offline toy set, as one preset of compare.py: fine-tune the teacher, train the baseline and
every method that reads the teacher-logit cache (response KD, CWD, DIST, LSKD; with --all every method, the feature
methods too) on the same data for several seeds, and report each student's final val mIoU as mean +- std over the
seeds, the paired difference against the baseline, the teacher as the reference. With --live-kd, also the methods'
live-teacher variants (response KD with the live teacher) and the teacher-logit cache's fidelity under augmentation.

    python demo.py                       # ~22 min on one CPU core (the teacher 13); results in checkpoints/demo/
    python demo.py --all                 # then: + the feature methods, which run the teacher live (~36 min more)
    python demo.py --live-kd             # then: + response KD with the live teacher, cache fidelity
    python demo.py --no-toy --data-dir ./data --image-size 256 --epochs 50 --teacher-epochs 0 --pretrained

Running it again continues where it stopped and keeps every finished run (compare.py's resumption).
--teacher-epochs 0 skips fine-tuning and distils from torchvision's pretrained teacher. Anything beyond these presets
(other strategies, seeds, grids, multi-scale evaluation): compare.py.
"""
import argparse
import os
import sys

import torch

import common
import compare
import distill
import errors
import fileio
import flags
import methods


def get_args_parser():
    parser = argparse.ArgumentParser(description="Teacher and students of every strategy, compared.")
    parser.add_argument("--data-dir", default="./data", help="data folder (default: %(default)s)")
    parser.add_argument("--toy", action=argparse.BooleanOptionalAction, default=True,
                        help="the synthetic VOC-format set under DATA_DIR/toy (offline); --no-toy: VOC 2012 under "
                             "--data-dir (default: the toy set)")
    parser.add_argument("--real", action=RealAlias, nargs=0, dest="toy", default=argparse.SUPPRESS,
                        help="deprecated name of --no-toy")
    parser.add_argument("--out-dir", default="checkpoints/demo", help="folder of all runs (default: %(default)s)")
    parser.add_argument("--seeds", type=compare.seed_list, default="0,1",
                        help="comma-separated seeds of the students (default: %(default)s)")
    parser.add_argument("--epochs", type=flags.positive_int, default=10,
                        help="epochs of each student (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=flags.non_negative_int, default=12,
                        help="epochs of teacher fine-tuning; 0 = use the pretrained teacher as is "
                             "(default: %(default)s)")
    parser.add_argument("--image-size", type=flags.image_size, default=64, help="input size (default: %(default)s)")
    parser.add_argument("--batch-size", type=flags.positive_int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=flags.positive_float, default=2e-3,
                        help="Adam lr for every run; 2e-3 suits the from-scratch toy runs (default: %(default)s)")
    parser.add_argument("--limit-val", type=flags.positive_int, default=None,
                        help="validate every run on the first N val images only (a quick look; default: all)")
    parser.add_argument("--limit-train", type=flags.positive_int, default=None,
                        help="train every run on the first N training images only (a quick look; default: all)")
    parser.add_argument("--all", action="store_true",
                        help="also train every other method (the feature methods run the teacher live: several times "
                             "a baseline epoch)")
    parser.add_argument("--live-kd", action="store_true",
                        help="also train response KD with the live teacher (--no-teacher-cache) for every seed, and "
                             "measure the teacher-logit cache against the live teacher on augmented crops")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                        help="start from torchvision's pretrained weights (needs them downloaded); --no-pretrained: "
                             "random weights, as the toy presets are (default: %(default)s)")
    return parser


class RealAlias(argparse.Action):
    """--real, the old name of --no-toy: sets it and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("warning: --real is deprecated and will be removed; it sets --no-toy, use that instead", file=sys.stderr)
        namespace.toy = False


def compare_args(args):
    """The comparison this demo is: compare.py's namespace, its defaults replaced by the demo's toy presets."""
    ns = compare.get_args_parser().parse_args([])
    ns.strategies = [name for name, m in methods.registry().items() if args.all or m.TEACHER in ("none", "logits")]
    ns.strategies += [name for name, (_, fixed) in methods.strategies().items() if fixed] * args.live_kd  # variants
    for dest in ("seeds", "out_dir", "teacher_epochs", "epochs", "image_size", "batch_size", "lr", "data_dir",
                 "limit_train", "limit_val"):
        setattr(ns, dest, getattr(args, dest))
    ns.toy, ns.no_pretrained = args.toy, not args.pretrained
    return ns


def measure_cache_fidelity(args, teacher_path, out_dir):
    """The teacher-logit cache against the live teacher on augmented crops of the training set (fidelity.json)."""
    parsed = methods.get_args_parser(methods.registry()["response-kd"]).parse_args(
        [f"--image-size={args.image_size}", "--data-dir", args.data_dir, "--workers", "0"]
        + (["--toy"] if args.toy else [])
        + ([] if args.limit_train is None else [f"--limit-train={args.limit_train}"]))
    data = common.data_config(parsed)
    dataset = common.build_datasets(data, splits=("train",))["train"]
    cpu = torch.device("cpu")
    teacher = distill.build_frozen_teacher(teacher_path, data.num_classes, cpu, "fp32")
    cache = distill.TeacherLogitCache(teacher, dataset, cpu, args.batch_size, 0, "fp32")
    fidelity = {f"T={t:g}": distill.cache_fidelity(teacher, dataset, cache, cpu, "fp32", args.batch_size, t)
                for t in (1.0, 2.0)}
    fileio.write_json(os.path.join(out_dir, "fidelity.json"), fidelity)
    for t, f in fidelity.items():
        print(f"teacher-logit cache vs live teacher on augmented training crops ({t}): argmax agreement "
              f"{100 * f['argmax_agreement']:.2f}%, mean KL(live || cached) {f['kl_live_cached']:.4f} over "
              f"{f['pixels']:,} pixels")
    return fidelity


def main(args):
    rows = compare.main(compare_args(args))
    if args.live_kd and args.teacher_epochs > 0:  # the cache-vs-live study: the cache's fidelity beside the students
        measure_cache_fidelity(args, os.path.join(args.out_dir, "teacher", "best.pth"), args.out_dir)
    return rows


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
