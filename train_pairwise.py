"""Pair-wise distillation (SKD, Liu et al. CVPR 2019): node-to-node similarity of pooled head features.

    python train_pairwise.py --data-dir ./data                                      # pretrained COCO/VOC teacher
    python train_pairwise.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth

The method, its loss, flags and their defaults (with where they come from): methods/pairwise.py.
"""
import errors
import methods
from methods import pairwise
from methods.pairwise import pairwise_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(pairwise)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
