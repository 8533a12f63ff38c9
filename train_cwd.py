"""Channel-wise distillation, CWD (Shu et al. ICCV 2021) of the logits, at the teacher's stride 8.

    python train_cwd.py --data-dir ./data                                           # pretrained COCO/VOC teacher
    python train_cwd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_cwd.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache         # live teacher

The method, its loss, flags and their defaults (with where they come from): methods/cwd.py.
"""
import errors
import methods
from methods import cwd
from methods.cwd import cwd_loss  # noqa: F401 (the loss, importable from this script)

get_args_parser, main = methods.command(cwd)

if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
