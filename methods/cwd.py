"""Channel-wise distillation, CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV
2021): each class channel of the logits is turned into a distribution over the image's positions, and the student's
is pulled towards the teacher's, plus weighted cross-entropy on the labels.

loss = ce_weight * CE_w(student, labels) + cwd_weight * tau^2 * mean over (n, c) of
       KL(softmax over positions of teacher_c / tau || softmax over positions of student_c / tau).
Both logit maps are compared at the teacher's native output stride 8, as the paper's code compares logits at their own
resolution: the student's stride-16 logits upsampled 2x, the teacher's from the teacher-logit cache (sampled at the
centre of each stride-8 cell of the crop) or from the live teacher. At the input size the loss would cost ~64x more
elementwise work for nearly the same value (bilinear upsampling repeats each position's value over its neighbourhood,
and a KL between spatial distributions does not change when every position is repeated alike). Positions outside the
image (crop padding) are left out of the distributions: the student sees black there, the cached teacher border
values.

Defaults tau 4 and weight 3 follow the paper's code (tau 4 is the default temperature of the authors' released
CriterionCWD); mmrazor's configs use tau 1 and weight 5. We keep the authors' pair: their paper's numbers come from it,
and the softer spatial distribution at tau 4 passes on where else in the image the teacher sees a class, not only its
peak.
"""
import common
import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "cwd", "logits", ("ce", "cwd"), 20
DESCRIPTION = "Train the student with channel-wise distillation (CWD)."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "cwd", 3.0, "the CWD term", "the paper's code")
    flags.add_tau(parser, 4.0, "the paper's code")


def cwd_loss(student_logits, teacher_logits, tau, valid=None):
    """Channel-wise distillation (Shu et al. 2021) of two (N, C, H, W) maps: for each (n, c) the softmax over the
    H*W positions of map / tau, KL(teacher || student) summed over positions, averaged over the N*C maps, times tau^2.
    valid (N, H, W) bool, optional: positions taken into the distributions (the others are left out)."""
    n, c = student_logits.shape[:2]
    keep = None if valid is None else valid.reshape(n, 1, -1)
    kl = distill.softened_kl(student_logits.reshape(n, c, -1), teacher_logits.reshape(n, c, -1), tau, dim=-1,
                             keep=keep)
    return kl.mean() * tau ** 2


def native_cwd(batch, student_native, teacher_native, tau):
    """CWD of the student's stride-16 logits (upsampled 2x) and the teacher's stride-8 ones, crop padding left out."""
    valid = ~common.outside_image(distill.cell_grid(batch["grid"]))
    return cwd_loss(distill.to_teacher_size(student_native, teacher_native), teacher_native, tau, valid)


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    tau, ce_weight, cwd_weight = args.tau, args.ce_weight, args.cwd_weight

    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        ce = criterion(logits, batch["mask"])
        cwd = native_cwd(batch, feats["logits"], distill.teacher_native_logits(batch, teacher, teacher_dtype), tau)
        return ce_weight * ce + cwd_weight * cwd, {"ce": ce, "cwd": cwd}
    return Loss(compute_loss)
