"""Response-based KD (Hinton et al. 2015): the student matches the teacher's softened per-pixel class distributions.

    python train_response_kd.py --data-dir ./data                                   # pretrained COCO/VOC teacher
    python train_response_kd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_response_kd.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache   # live teacher

The method, its loss, flags and their defaults (with where they come from): methods/response_kd.py.
"""
import errors
import methods
from methods import response_kd
from methods.response_kd import response_kd_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(response_kd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
