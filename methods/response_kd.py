"""Response-based KD (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015): the student matches the
teacher's temperature-softened per-pixel class distributions, plus weighted cross-entropy on the labels.

loss = ce_weight * CE_w(student, labels) + kd_weight * tau^2 * KL(p_teacher^tau || p_student^tau), the KL averaged
over non-255 pixels at the input size. By default the teacher's logits come from the teacher-logit cache (warped with
each sample's augmentation); --no-teacher-cache runs it live (strategy response-kd-live in compare.py).
"""
import common
import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "response-kd", "logits", ("ce", "kd"), 10
OLD_FLAGS = ("temperature", "soft_target_weight")  # their names before the flags were made consistent
DESCRIPTION = "Train the student with response-based knowledge distillation."
VARIANTS = {"response-kd-live": {"no_teacher_cache": True}}


def add_args(parser):
    flags.add_weight(parser, "ce", 0.5, "the label CE term")
    flags.add_weight(parser, "kd", 0.5, "the KD term")
    flags.add_tau(parser, 2.0, "this repo's choice")


def response_kd_loss(student_logits, teacher_logits, target, tau):
    """tau^2 * mean over non-ignore pixels of KL(softmax(t/tau) || softmax(s/tau)) (Hinton et al. 2015)."""
    kl = distill.softened_kl(student_logits, teacher_logits, tau)  # (B, H, W)
    valid = target != common.IGNORE_INDEX
    return kl[valid].sum() / valid.sum().clamp(min=1) * tau ** 2


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    tau, ce_weight, kd_weight = args.tau, args.ce_weight, args.kd_weight

    def compute_loss(net, batch):
        logits = net(batch["image"])
        teacher_logits = distill.batch_teacher_logits(batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        kd = response_kd_loss(logits, teacher_logits, batch["mask"], tau)
        return ce_weight * ce + kd_weight * kd, {"ce": ce, "kd": kd}
    return Loss(compute_loss)
