"""Feature CWD: channel-wise distillation (Shu et al., ICCV 2021) of features, beside the logit CWD term: each
channel of the student's last features, aligned to the teacher's channels by a 1x1 conv, becomes a distribution over
the positions, pulled towards the same channel of the teacher's (CIRKD's feature setting), plus weighted CE.

loss = ce_weight * CE_w + feature_cwd_weight * cwd(align(student head), teacher head, tau)
       + cwd_weight * cwd(student logits, teacher logits, tau)   (the logit term of train_cwd.py, at stride 8)
Pair: the student's head (256 ch, stride 16, upsampled 2x bilinearly after the alignment) -> the FCN head's 512 ch at
stride 8 (distill.HEAD_CHANNELS), the decoder features CIRKD distils. The CWD sum runs over the teacher's channels (the
aligned map has them), so it is averaged over those (CIRKD's losses/cwd.py divides by the student's channel count
while summing the teacher's). The aligner (no bias, as CIRKD's) trains with the student and is saved as the
checkpoint's 'adapters'. The teacher runs live: its features are too large to cache.

Defaults: CIRKD's CWD setting (github.com/winycg/CIRKD, train_scripts/train_kd/train_cwd.sh and train_kd.py):
--lambda-cwd-fea 50 and --lambda-cwd-logit 3, both at temperature 4. CIRKD's script also adds logit KD and an
adversarial term; those are left out, so the row differs from cwd by the feature term alone (--cwd-weight 0: the
feature term alone).
"""
import torch.nn as nn

import distill
import flags
from methods import Loss, cwd

NAME, TEACHER, TERMS, ORDER = "feature-cwd", "features", ("ce", "feature_cwd", "cwd"), 60
DESCRIPTION = "Train the student with channel-wise distillation of features and logits (feature CWD)."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "feature_cwd", 50.0, "the feature CWD term", "CIRKD's --lambda-cwd-fea")
    flags.add_weight(parser, "cwd", 3.0, "the logit CWD term", "CIRKD's --lambda-cwd-logit")
    flags.add_tau(parser, 4.0, "CIRKD's CriterionCWD")


def build_aligner():
    return nn.ModuleDict({"align": nn.Conv2d(distill.HEAD_CHANNELS["student"], distill.HEAD_CHANNELS["teacher"], 1,
                                             bias=False)})


def feature_cwd_loss(student_feat, teacher_feat, align, tau):
    """CWD of align(student_feat), resized to the teacher's size, and teacher_feat: mean over the (n, teacher channel)
    maps of tau^2 KL between their spatial softmaxes (train_cwd.cwd_loss)."""
    return cwd.cwd_loss(distill.to_teacher_size(align(student_feat), teacher_feat), teacher_feat, tau)


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    modules = build_aligner()
    tau, ce_weight, feature_weight, logit_weight = args.tau, args.ce_weight, args.feature_cwd_weight, args.cwd_weight

    def compute_loss(net, batch):
        logits, feats, teacher_logits, teacher_feats = distill.both_networks(net, batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        feature = feature_cwd_loss(feats["head"], teacher_feats["head"], modules["align"], tau)
        logit = cwd.native_cwd(batch, feats["logits"], teacher_logits, tau)
        return ce_weight * ce + feature_weight * feature + logit_weight * logit, \
            {"ce": ce, "feature_cwd": feature, "cwd": logit}
    return Loss(compute_loss, modules)
