"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): the student matches the
teacher's class probabilities by correlation instead of exact values, across classes at each pixel (inter-class) and
across pixels for each class (intra-class), plus weighted cross-entropy on the labels.

    python train_dist.py --data-dir ./data                                          # pretrained COCO/VOC teacher
    python train_dist.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_dist.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache        # live teacher

loss = ce_weight * CE_w(student, labels) + tau^2 * (beta * inter + gamma * intra), over the positions whose label is
not 255, at the teacher's native output stride 8 (as train_cwd.py: the student's stride-16 logits upsampled 2x, the
teacher's from the teacher-logit cache by default or run live; each position's label is the one at its centre).

Under torchrun each process computes the intra-class term on its own share of the batch, as the authors' per-GPU
code does: DDP then averages the processes' gradients, so the loss is the mean of per-process DIST losses, not DIST of
the whole global batch (the intra-class correlation of the union of the shares is not a mean of theirs).
"""
import argparse

import torch.nn.functional as F

import common
import distill
import engine
import errors
import flags


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train the student with DIST (correlation-based distillation).")
    engine.add_training_args(parser)
    distill.add_teacher_args(parser)
    distill.add_logit_cache_arg(parser)
    parser.add_argument("--ce-weight", type=flags.non_negative_float, default=1.0,
                        help="weight of the label CE term (default: %(default)s)")
    parser.add_argument("--beta", type=flags.non_negative_float, default=1.0,
                        help="weight of the inter-class term (default: %(default)s, the authors' segmentation setting)")
    parser.add_argument("--gamma", type=flags.non_negative_float, default=1.0,
                        help="weight of the intra-class term (default: %(default)s, the authors' segmentation setting)")
    parser.add_argument("--tau", type=flags.positive_float, default=1.0,
                        help="softmax temperature (default: %(default)s, the authors' segmentation setting)")
    return parser


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


def dist_loss(student_logits, teacher_logits, target, tau, beta, gamma):
    """DIST (Huang et al. 2022): tau^2 * (beta * inter + gamma * intra), see dist_terms."""
    inter, intra = dist_terms(student_logits, teacher_logits, target, tau)
    return tau ** 2 * (beta * inter + gamma * intra)


def make_compute_loss(criterion, teacher, teacher_dtype, tau, beta, gamma, ce_weight):
    """compute_loss(net, batch) -> (loss, {term: value}) of DIST; teacher=None reads the batch's cached teacher
    logits, else the teacher runs live on the augmented batch."""
    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        student, teacher_logits = distill.native_logits(batch, feats["logits"], teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        inter, intra = dist_terms(student, teacher_logits, distill.cell_labels(batch["mask"], student.shape[-2:]), tau)
        dist = tau ** 2 * (beta * inter + gamma * intra)
        return ce_weight * ce + dist, {"ce": ce, "dist_inter": inter, "dist_intra": intra}
    return compute_loss


def main(args):
    run = distill.setup_distillation(args, strategy="dist")
    teacher = distill.logit_source(run, args.batch_size, args.no_teacher_cache)
    compute_loss = make_compute_loss(run.criterion, teacher, run.teacher_dtype, args.tau, args.beta, args.gamma,
                                     args.ce_weight)
    return engine.train(run.student, compute_loss, run.datasets, run.criterion, run.cfg)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
