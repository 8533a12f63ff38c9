"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): the student matches the
teacher's class probabilities by correlation instead of exact values, across classes at each pixel (inter-class) and
across pixels for each class (intra-class), plus weighted cross-entropy on the labels.

loss = ce_weight * CE_w(student, labels) + tau^2 * (dist_inter_weight * inter + dist_intra_weight * intra), over the
positions whose label is not 255, at the teacher's native output stride 8 (as CWD: the student's stride-16 logits
upsampled 2x, the teacher's from the teacher-logit cache by default or run live; each position's label is the one at
its centre). Defaults (tau 1, both weights 1) are the authors' segmentation setting (beta, gamma in the paper).

Under torchrun each process computes the intra-class term on its own share of the batch, as the authors' per-GPU
code does: DDP then averages the processes' gradients, so the loss is the mean of per-process DIST losses, not DIST of
the whole global batch (the intra-class correlation of the union of the shares is not a mean of theirs).
"""
import torch.nn.functional as F

import common
import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "dist", "logits", ("ce", "dist_inter", "dist_intra"), 30
OLD_FLAGS = ("beta", "gamma")  # their names before the flags were made consistent
DESCRIPTION = "Train the student with DIST (correlation-based distillation)."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "dist_inter", 1.0, "the inter-class term (the paper's beta)",
                     "the authors' segmentation setting")
    flags.add_weight(parser, "dist_intra", 1.0, "the intra-class term (the paper's gamma)",
                     "the authors' segmentation setting")
    flags.add_tau(parser, 1.0, "the authors' segmentation setting")


def pearson(a, b, dim):
    """Pearson correlation of a and b along dim (0 where either is constant, as the authors' eps-guarded code)."""
    return F.cosine_similarity(a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True), dim=dim, eps=1e-8)


def dist_terms(student_logits, teacher_logits, target, tau):
    """(inter, intra) of DIST over the pixels whose target is not 255: 1 - mean Pearson correlation of the two class
    probability vectors (softmax at tau) per pixel, and 1 - mean over classes of the correlation of each class's
    probabilities across all those pixels."""
    valid = target != common.IGNORE_INDEX
    if not valid.any():
        zero = student_logits.sum() * 0.0  # no pixel: no loss, and a gradient of zeros
        return zero, zero
    p_s = F.softmax(student_logits.float().permute(0, 2, 3, 1)[valid] / tau, dim=1)  # (P, C)
    p_t = F.softmax(teacher_logits.float().permute(0, 2, 3, 1)[valid] / tau, dim=1)
    inter = 1 - pearson(p_s, p_t, dim=1).mean()
    intra = 1 - pearson(p_s, p_t, dim=0).mean()
    return inter, intra


def dist_loss(student_logits, teacher_logits, target, tau, inter_weight, intra_weight):
    """DIST (Huang et al. 2022): tau^2 * (inter_weight * inter + intra_weight * intra), see dist_terms."""
    inter, intra = dist_terms(student_logits, teacher_logits, target, tau)
    return tau ** 2 * (inter_weight * inter + intra_weight * intra)


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    tau, ce_weight, inter_weight, intra_weight = args.tau, args.ce_weight, args.dist_inter_weight, \
        args.dist_intra_weight

    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        teacher_logits = distill.teacher_native_logits(batch, teacher, teacher_dtype)
        student = distill.to_teacher_size(feats["logits"], teacher_logits)
        ce = criterion(logits, batch["mask"])
        inter, intra = dist_terms(student, teacher_logits, distill.cell_labels(batch["mask"], student.shape[-2:]), tau)
        dist = tau ** 2 * (inter_weight * inter + intra_weight * intra)
        return ce_weight * ce + dist, {"ce": ce, "dist_inter": inter, "dist_intra": intra}
    return Loss(compute_loss)
