"""Masked generative distillation, MGD (Yang et al. ECCV 2022): rebuild the teacher's features from masked ones.

    python train_mgd.py --data-dir ./data                                           # pretrained COCO/VOC teacher
    python train_mgd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_mgd.py --toy --no-pretrained --teacher-weights T.pth --cwd-weight 0   # without the logit term

The method, its loss, flags and their defaults (with where they come from): methods/mgd.py.
"""
import errors
import methods
from methods import mgd
from methods.mgd import mgd_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(mgd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
