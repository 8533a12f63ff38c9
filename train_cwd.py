"""Channel-wise distillation, CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021):
each class channel of the logits is turned into a distribution over the image's positions, and the student's is
pulled towards the teacher's, plus weighted cross-entropy on the labels.

    python train_cwd.py --data-dir ./data                                           # pretrained COCO/VOC teacher
    python train_cwd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_cwd.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache         # live teacher

loss = ce_weight * CE_w(student, labels) + cwd_weight * tau^2 * mean over (n, c) of
       KL(softmax over positions of teacher_c / tau || softmax over positions of student_c / tau).
Both logit maps are compared at the teacher's native output stride 8, as the paper's code compares logits at their own
resolution: the student's stride-16 logits upsampled 2x, the teacher's straight from the teacher-logit cache (sampled
at the centre of each stride-8 cell of the crop) or from the live teacher. At the input size the loss would cost ~64x
more elementwise work for nearly the same value (bilinear upsampling repeats each position's value over its
neighbourhood, and a KL between spatial distributions does not change when every position is repeated alike).
Positions outside the image (crop padding) are left out of the distributions: the student sees black there, the cached
teacher border values.
"""
import argparse

import torch.nn.functional as F

import common
import distill
import engine
import errors
import flags


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train the student with channel-wise distillation (CWD).")
    engine.add_training_args(parser)
    distill.add_teacher_args(parser)
    distill.add_logit_cache_arg(parser)
    parser.add_argument("--ce-weight", type=flags.non_negative_float, default=1.0,
                        help="weight of the label CE term (default: %(default)s)")
    parser.add_argument("--cwd-weight", type=flags.non_negative_float, default=3.0,
                        help="weight of the CWD term (default: %(default)s, the paper's code)")
    parser.add_argument("--tau", type=flags.positive_float, default=4.0,
                        help="temperature of the spatial softmax (default: %(default)s, the paper's code)")
    return parser


def cwd_loss(student_logits, teacher_logits, tau, valid=None):
    """Channel-wise distillation (Shu et al. 2021) of two (N, C, H, W) logit maps: for each (n, c) the softmax over
    the H*W positions of logits / tau, KL(teacher || student) summed over positions, averaged over the N*C maps, times
    tau^2. valid (N, H, W) bool, optional: positions taken into the distributions (the others are left out).

    Defaults tau 4 and weight 3 follow the paper's code (tau 4 is the default temperature of the authors' released
    CriterionCWD); mmrazor's configs use tau 1 and weight 5. We keep the authors' pair: their paper's numbers come from
    it, and the softer spatial distribution at tau 4 passes on where else in the image the teacher sees a class, not
    only its peak.
    """
    n, c = student_logits.shape[:2]
    s = student_logits.float().reshape(n, c, -1) / tau
    t = teacher_logits.float().reshape(n, c, -1) / tau
    if valid is None:
        log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:
        keep = valid.reshape(n, 1, -1).expand_as(s)
        # left-out positions get -inf logits (probability 0), then 0 log-probabilities, so they add nothing to the
        # sum and no NaN reaches the gradient
        log_ps = F.log_softmax(s.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
        log_pt = F.log_softmax(t.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
        kl = (log_pt.exp() * keep * (log_pt - log_ps)).sum(-1)
    return kl.mean() * tau ** 2


def make_compute_loss(criterion, teacher, teacher_dtype, tau, ce_weight, cwd_weight):
    """compute_loss(net, batch) -> (loss, {term: value}) of CWD; teacher=None reads the batch's cached teacher logits,
    else the teacher runs live on the augmented batch."""
    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        student, teacher_logits = distill.native_logits(batch, feats["logits"], teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        cwd = cwd_loss(student, teacher_logits, tau, valid=~common.outside_image(distill.cell_grid(batch["grid"])))
        return ce_weight * ce + cwd_weight * cwd, {"ce": ce, "cwd": cwd}
    return compute_loss


def main(args):
    run = distill.setup_distillation(args, strategy="cwd")
    teacher = distill.logit_source(run, args.batch_size, args.no_teacher_cache)
    compute_loss = make_compute_loss(run.criterion, teacher, run.teacher_dtype, args.tau, args.ce_weight,
                                     args.cwd_weight)
    return engine.train(run.student, compute_loss, run.datasets, run.criterion, run.cfg)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
