"""Attention transfer, AT (Zagoruyko & Komodakis ICLR 2017): spatial attention maps of the head features.

    python train_at.py --data-dir ./data                                            # pretrained COCO/VOC teacher
    python train_at.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth

The method, its loss, flags and their defaults (with where they come from): methods/at.py.
"""
import errors
import methods
from methods import at
from methods.at import at_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(at)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
