"""Feature CWD (CIRKD's setting): channel-wise distillation of the aligned head features, beside logit CWD.

    python train_feature_cwd.py --data-dir ./data                                   # pretrained COCO/VOC teacher
    python train_feature_cwd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_feature_cwd.py --toy --no-pretrained --teacher-weights T.pth --cwd-weight 0   # features alone

The method, its loss, flags and their defaults (with where they come from): methods/feature_cwd.py.
"""
import errors
import methods
from methods import feature_cwd
from methods.feature_cwd import feature_cwd_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(feature_cwd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
