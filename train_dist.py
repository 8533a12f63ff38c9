"""DIST (Huang et al. NeurIPS 2022): inter- and intra-class correlation of the class probabilities, at stride 8.

    python train_dist.py --data-dir ./data                                          # pretrained COCO/VOC teacher
    python train_dist.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_dist.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache        # live teacher

The method, its loss, flags and their defaults (with where they come from): methods/dist.py.
"""
import errors
import methods
from methods import dist
from methods.dist import dist_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(dist)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
