"""Logit-standardised KD, LSKD (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): at each
pixel both networks' logits are z-scored over the classes before the softened KL of response KD, so the student
matches the teacher's logit relations rather than their range, plus weighted cross-entropy on the labels.

loss = ce_weight * CE_w(student, labels) + lskd_weight * tau^2 * KL(softmax(z(t)/tau) || softmax(z(s)/tau)),
z(x) = (x - mean_c x) / (1e-7 + std_c x) (unbiased std over the classes, as the authors' normalize()), the KL summed
over classes and averaged over the non-255 positions at the teacher's stride 8, as CWD and DIST (the student's
stride-16 logits upsampled 2x; the teacher's from the teacher-logit cache or live; each position's label the one at
its centre). At the input size, like response KD, its per-pixel standardisation made an epoch cost 2.3x the
baseline's (bench_throughput.py, 256 px, one CPU thread; response KD: 1.5x); stride 8 has 64x fewer positions.

Defaults from the authors' code (github.com/sunshangquan/logit-standardization-KD: README's "KD+Ours" command
`--logit-stand --base-temp 2 --kd-weight 9`, mdistiller/distillers/KD.py): tau 2, weight 9. They published no
segmentation setting; the CE weight stays this repo's 1.0.
"""
import common
import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "lskd", "logits", ("ce", "lskd"), 40
DESCRIPTION = "Train the student with logit-standardised KD (LSKD)."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "lskd", 9.0, "the standardised KD term", "the authors' --kd-weight 9")
    flags.add_tau(parser, 2.0, "the authors' --base-temp 2")


def standardize(logits, dim=1):
    """Z-score along dim: (x - mean) / (1e-7 + unbiased std), as the authors' normalize()."""
    mean, std = logits.mean(dim, keepdim=True), logits.std(dim, keepdim=True)
    return (logits - mean) / (1e-7 + std)


def lskd_loss(student_logits, teacher_logits, tau, valid=None):
    """tau^2 * KL(softmax(z(t)/tau) || softmax(z(s)/tau)) of (N, C, H, W) logits, summed over classes, averaged over
    the pixels (those where valid (N, H, W) is True, if given) (Sun et al. 2024)."""
    kl = distill.softened_kl(standardize(student_logits.float()), standardize(teacher_logits.float()), tau)
    if valid is None:
        return kl.mean() * tau ** 2
    return kl[valid].sum() / valid.sum().clamp(min=1) * tau ** 2


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    tau, ce_weight, lskd_weight = args.tau, args.ce_weight, args.lskd_weight

    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        teacher_logits = distill.teacher_native_logits(batch, teacher, teacher_dtype)
        student = distill.to_teacher_size(feats["logits"], teacher_logits)
        ce = criterion(logits, batch["mask"])
        valid = distill.cell_labels(batch["mask"], student.shape[-2:]) != common.IGNORE_INDEX
        lskd = lskd_loss(student, teacher_logits, tau, valid)
        return ce_weight * ce + lskd_weight * lskd, {"ce": ce, "lskd": lskd}
    return Loss(compute_loss)
