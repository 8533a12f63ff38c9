"""Baseline: the student (or, with --model teacher, the FCN-ResNet50 teacher fine-tuned) trained with the
class-weighted cross-entropy alone."""
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "baseline", "none", ("ce",), 0
DESCRIPTION = "Train a segmentation model with weighted cross-entropy."


def add_args(parser):
    parser.add_argument("--model", choices=("student", "teacher"), default="student",
                        help="student (LightweightDeepLabV3) or teacher (FCN-ResNet50) (default: %(default)s)")


def run_name(args):
    return f"baseline-{args.model}"


def build_loss(args, context):
    criterion = context.criterion

    def compute_loss(net, batch):
        ce = criterion(net(batch["image"]), batch["mask"])
        return ce, {"ce": ce}
    return Loss(compute_loss)
