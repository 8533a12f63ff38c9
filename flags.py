"""Command-line flags every script shares: range-checked number types and the data flags (add_data_args).

A bad value is an argparse error naming the flag, exit code 2, before any work.
"""
import argparse
import math
import os
import sys

from voc import VOC_CLASSES


def checked(convert, ok, requirement):
    """An argparse type: convert(text), refused unless ok(value), naming the requirement."""
    def parse(text):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse's message for unparsable text: "invalid int value: 'x'"
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, ">= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
non_negative_float = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
fraction = checked(float, lambda v: 0 < v < 1, "strictly between 0 and 1")
seed_value = checked(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32), the range numpy's seed takes")
MIN_IMAGE_SIZE = 16
image_size = checked(int, lambda v: v >= MIN_IMAGE_SIZE, f">= {MIN_IMAGE_SIZE} (the networks downsample by 16)")


# mmsegmentation's multi-scale test goes to 1.75; 4 leaves room, and a typo (125) does not build 32k-px inputs
MAX_SCALE = 4.0


def scales(text):
    """--scales: comma-separated distinct scale factors > 0, e.g. 0.5,0.75,1.0,1.25,1.5,1.75."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.5,1.0,1.5, got {text}") from None
    if not all(0 < v <= MAX_SCALE for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"must be distinct numbers in (0, {MAX_SCALE:g}], got {text} (a scale s costs "
                                         f"s^2 a single-scale pass: {MAX_SCALE:g} is already {MAX_SCALE ** 2:g}x)")
    return values


def name_list(allowed):
    """An argparse type: comma-separated distinct names from allowed (in the order given), or "all" (every one)."""
    def parse(text):
        if text == "all":
            return list(allowed)
        names = [n.strip() for n in text.split(",")]
        if any(n not in allowed for n in names) or len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(f"must be all or distinct names from {','.join(allowed)}, got {text}")
        return names
    parse.__name__ = "list of names"
    return parse


def add_multiscale_args(parser):
    """--scales and --flip of the final evaluation (evaluate.py, compare.py)."""
    parser.add_argument("--scales", type=scales, default=(1.0,), metavar="S1,S2,...",
                        help="evaluate at every scale: the image resized as usual but to round(image-size * S), the "
                             "class probabilities at original resolution averaged over scales (mmsegmentation's "
                             "multi-scale test, e.g. 0.5,0.75,1.0,1.25,1.5,1.75; default: 1.0, single scale)")
    parser.add_argument("--flip", action="store_true",
                        help="also evaluate each scale's horizontal mirror (its logits mirrored back), averaged in")
    return parser


# --image-size when it is not given, by what a script does with the images: the one place these defaults live
REAL_IMAGE_SIZE, TOY_IMAGE_SIZE = 256, 128
IMAGE_SIZE_RULES = {
    "training": f"{REAL_IMAGE_SIZE}; {TOY_IMAGE_SIZE} with --toy",
    "checkpoint": f"the size the checkpoint was trained at; else {REAL_IMAGE_SIZE} ({TOY_IMAGE_SIZE} with --toy)",
    "deployment": f"{REAL_IMAGE_SIZE}, the size the student is deployed at, also with --toy",
}


def default_image_size(rule, toy, trained=None):
    """--image-size when not given, by the script's rule (IMAGE_SIZE_RULES); trained: a checkpoint's training size."""
    if rule == "deployment":
        return REAL_IMAGE_SIZE
    if rule == "checkpoint" and trained:
        return trained
    return TOY_IMAGE_SIZE if toy else REAL_IMAGE_SIZE


def add_data_args(parser, image_size_rule, seed=True, trains=True):
    """Flags that say which data to read (every script that touches data); image_size_rule: how --image-size defaults
    in this script (a key of IMAGE_SIZE_RULES), recorded for data_config() with the defaults of the training-only data
    flags (a training script's own --limit-train and --train-set replace them). seed=False: the script sets the seed
    itself (compare.py's --seeds). trains=False: the script only runs the networks forward (its help says so)."""
    parser.set_defaults(image_size_rule=image_size_rule, limit_train=None, train_set="train")
    use = "training crops and validation resize" if trains else "each image resized to N x N"
    parser.add_argument("--data-dir", default="./data", help="folder holding VOCdevkit/VOC2012 (downloaded here "
                        "on first use) and, with --toy, the synthetic set (default: %(default)s)")
    parser.add_argument("--toy", action="store_true", help="use the synthetic VOC-format dataset generated under "
                        "DATA_DIR/toy (offline, small; default: real VOC 2012)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading VOC if it is missing")
    parser.add_argument("--cache-dir", default=None, help="where decoded pixels, class weights and teacher logits "
                        "are cached, a subfolder per dataset (default: $XDG_CACHE_HOME/voc-kd or ~/.cache/voc-kd)")
    parser.add_argument("--num-classes", type=positive_int, default=len(VOC_CLASSES),
                        help="classes in the masks, background included (default: %(default)s)")
    parser.add_argument("--image-size", type=image_size, default=None,
                        help=f"network input size: {use} (default: {IMAGE_SIZE_RULES[image_size_rule]})")
    parser.add_argument("--eval-size", type=image_size, default=None, help="compute metrics on masks resized to "
                        "N x N instead of at each image's original resolution (default: original)")
    parser.add_argument("--limit-val", type=positive_int, default=None, help="use only the first N val images")
    parser.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                        help="data loader worker processes (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    if seed:
        parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------------------------
# The methods' own flags: one name for a softmax temperature, one pattern for a loss term's weight
# ---------------------------------------------------------------------------------------------

# flags renamed for that consistency: old dest -> new dest (the old flag still works, with a warning, and a run
# recorded under the old name is compared under the new one on --resume)
RENAMED = {"temperature": "tau", "soft_target_weight": "kd_weight", "beta": "dist_inter_weight",
           "gamma": "dist_intra_weight", "feat_weight": "feat_stage16_weight", "final_feat_weight": "feat_head_weight"}


def add_tau(parser, default, source):
    """--tau, the softmax temperature of a method's distributions (source: where the default comes from)."""
    parser.add_argument("--tau", type=positive_float, default=default,
                        help=f"softmax temperature (default: %(default)s, {source})")


def add_weight(parser, term, default, what, source=None):
    """--TERM-weight, the weight of the loss term TERM (its name in history.json's train_loss_TERM)."""
    parser.add_argument(f"--{term.replace('_', '-')}-weight", type=non_negative_float, default=default,
                        help=f"weight of {what} (default: %(default)s{', ' + source if source else ''})")


def add_deprecated_aliases(parser, old_names):
    """Flags under their old names (keys of RENAMED): each sets the new flag and says so on stderr, once per use."""
    for old in old_names:
        action = next(a for a in parser._actions if a.dest == RENAMED[old])
        parser.add_argument(f"--{old.replace('_', '-')}", dest=action.dest, type=action.type,
                            default=argparse.SUPPRESS, action=DeprecatedAlias, metavar=action.metavar,
                            help=f"deprecated name of {action.option_strings[0]}")


class DeprecatedAlias(argparse.Action):
    """An old flag name: sets the new one and prints one line saying so."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option_string} is deprecated and will be removed; it sets {new}, use that instead",
              file=sys.stderr)
        setattr(namespace, self.dest, values)
