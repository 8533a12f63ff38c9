"""Logit-standardised KD, LSKD (Sun et al. CVPR 2024): response KD of per-pixel z-scored logits.

    python train_lskd.py --data-dir ./data                                          # pretrained COCO/VOC teacher
    python train_lskd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_lskd.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache        # live teacher

The method, its loss, flags and their defaults (with where they come from): methods/lskd.py.
"""
import errors
import methods
from methods import lskd
from methods.lskd import lskd_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(lskd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
