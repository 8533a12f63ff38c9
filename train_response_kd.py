"""Response-based KD (Hinton et al. 2015): the student matches the teacher's temperature-softened per-pixel
class distributions, plus weighted cross-entropy on the labels.

    python train_response_kd.py --data-dir ./data                                   # pretrained COCO/VOC teacher
    python train_response_kd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth
    python train_response_kd.py --toy --no-pretrained --teacher-weights T.pth --no-teacher-cache   # live teacher

loss = ce_weight * CE_w(student, labels) + soft_target_weight * T^2 * KL(p_teacher^T || p_student^T),
the KL averaged over non-ignore pixels. By default the teacher runs once over the training set and its logits
are cached (fp16, native stride 8) and warped with each sample's augmentation.
"""
import argparse

import torch.nn.functional as F

import common
import distill
import engine
import errors
import flags


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train the student with response-based knowledge distillation.")
    engine.add_training_args(parser)
    distill.add_teacher_args(parser)
    parser.add_argument("--ce-weight", type=flags.non_negative_float, default=0.5,
                        help="weight of the label CE term (default: %(default)s)")
    parser.add_argument("--soft-target-weight", type=flags.non_negative_float, default=0.5,
                        help="weight of the KD term (default: %(default)s)")
    parser.add_argument("--temperature", type=flags.positive_float, default=2.0,
                        help="softmax temperature T of both distributions (default: %(default)s)")
    distill.add_logit_cache_arg(parser)
    return parser


def response_kd_loss(student_logits, teacher_logits, target, temperature):
    """T^2 * mean over non-ignore pixels of KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)  # (B, H, W)
    valid = target != common.IGNORE_INDEX
    return kl[valid].sum() / valid.sum().clamp(min=1) * temperature ** 2


def make_compute_loss(criterion, teacher, teacher_dtype, temperature, ce_weight, soft_target_weight):
    """compute_loss(net, batch) -> (loss, {term: value}) of response KD; teacher=None reads the batch's cached
    teacher logits (TeacherLogitCache), else the teacher runs live on the augmented batch."""
    def compute_loss(net, batch):
        logits = net(batch["image"])
        teacher_logits = distill.batch_teacher_logits(batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        kd = response_kd_loss(logits.float(), teacher_logits, batch["mask"], temperature)
        return ce_weight * ce + soft_target_weight * kd, {"ce": ce, "kd": kd}
    return compute_loss


def main(args):
    run = distill.setup_distillation(args, strategy="response-kd")
    teacher = distill.logit_source(run, args.batch_size, args.no_teacher_cache)
    compute_loss = make_compute_loss(run.criterion, teacher, run.teacher_dtype, args.temperature, args.ce_weight,
                                     args.soft_target_weight)
    return engine.train(run.student, compute_loss, run.datasets, run.criterion, run.cfg)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
