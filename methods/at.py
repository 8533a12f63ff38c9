"""Attention transfer, AT (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017): the student's
spatial attention map (where its features are strong) is pulled towards the teacher's, plus weighted CE.

attention map of a (B, C, H, W) feature: the channel mean of its square, flattened and divided by its L2 norm over
the positions; at_loss: the mean over images and positions of the squared difference of the two maps (CIRKD's
losses/at.py, github.com/winycg/CIRKD). The maps must have the same positions: the student's head (256 ch, stride 16)
is upsampled 2x bilinearly (align_corners=False) to the FCN head's size (512 ch, stride 8; distill.HEAD_CHANNELS)
before its attention map is taken. No adapter: a channel mean does not depend on the channel count.

Default weight 10000: CIRKD's --lambda-at (train_scripts/train_kd/train_at.sh); its logit KD term is left out, so
the row measures AT alone. The loss is a mean over positions of maps of unit norm, so it shrinks as 1/positions: the
same weight pulls harder at small inputs (64 positions at 64 px, 1,024 at 256 px).
"""
import torch.nn.functional as F

import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "at", "features", ("ce", "at"), 90
DESCRIPTION = "Train the student with attention transfer (AT) of features."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "at", 1e4, "the attention-transfer term", "CIRKD's --lambda-at")


def attention_map(feat):
    """(B, H*W): mean over channels of feat^2, L2-normalised over the positions."""
    return F.normalize(feat.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_feat, teacher_feat):
    """Mean squared difference of the attention maps (Zagoruyko & Komodakis 2017), the student's feature resized to
    the teacher's size first."""
    return (attention_map(distill.to_teacher_size(student_feat, teacher_feat))
            - attention_map(teacher_feat)).pow(2).mean()


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    ce_weight, weight = args.ce_weight, args.at_weight

    def compute_loss(net, batch):
        logits, feats, _, teacher_feats = distill.both_networks(net, batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        at = at_loss(feats["head"], teacher_feats["head"])
        return ce_weight * ce + weight * at, {"ce": ce, "at": at}
    return Loss(compute_loss)
