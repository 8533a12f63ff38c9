"""Feature-based KD: cosine loss between 1x1-aligned student features and the teacher's ResNet50 stages.

    python train_feature_kd.py --data-dir ./data
    python train_feature_kd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth

The method, its loss, flags and their defaults (with where they come from): methods/feature_kd.py.
"""
import errors
import methods
from methods import feature_kd
from methods.feature_kd import cosine_feature_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(feature_kd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
