"""Baseline: train the student (or fine-tune the teacher) with class-weighted cross-entropy alone.

    python train_baseline.py --toy --epochs 5                     # offline, synthetic data, minutes on a CPU
    python train_baseline.py --data-dir ./data                    # PASCAL VOC 2012 (downloaded on first use)
    python train_baseline.py --model teacher --toy --epochs 3     # fine-tune the FCN-ResNet50 teacher
    python train_baseline.py --toy --out-dir checkpoints/b --resume   # continue an interrupted run

The method, its loss, flags and their defaults (with where they come from): methods/baseline.py.
"""
import errors
import methods
from methods import baseline

get_args_parser, main = methods.command(baseline)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
