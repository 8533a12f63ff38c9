"""Feature-based KD: student features, mapped by 1x1 alignment convs to the teacher's channel counts and resized to
its spatial size, are pulled towards the teacher's ResNet50 stage features by a cosine loss, plus weighted CE.

    python train_feature_kd.py --data-dir ./data
    python train_feature_kd.py --toy --no-pretrained --teacher-weights checkpoints/toy_teacher/best.pth

Pairs (student -> teacher): backbone stage at stride 16 (features[12], 112 ch) -> layer3 (1024 ch): both are the
last mid-level stage before the network's final block, holding parts/textures; head pre-classifier features
(256 ch) -> layer4 (2048 ch): both are what each network's classifier reads, so matching them transfers the
teacher's final representation. Teacher features are at stride 8, so the (aligned) student features are upsampled.
loss = CE_w + feat_weight * (1 - cos) on the mid pair + final_feat_weight * (1 - cos) on the final pair, each
averaged over positions. The alignment convs train with the student, are saved as the checkpoint's 'adapters',
and are not part of the deployable student ('model').
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import distill
import engine
import errors
import flags

FEATURE_PAIRS = {"stage16": ("layer3", 112, 1024), "head": ("layer4", 256, 2048)}  # student: (teacher, c_s, c_t)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train the student with feature-based knowledge distillation.")
    engine.add_training_args(parser)
    distill.add_teacher_args(parser)
    parser.add_argument("--feat-weight", type=flags.non_negative_float, default=0.1,
                        help="weight of the cosine loss on stage16 -> layer3 (default: %(default)s)")
    parser.add_argument("--final-feat-weight", type=flags.non_negative_float, default=0.5,
                        help="weight of the cosine loss on head -> layer4 (default: %(default)s)")
    return parser


def build_adapters():
    return nn.ModuleDict({s: nn.Conv2d(c_s, c_t, 1) for s, (_, c_s, c_t) in FEATURE_PAIRS.items()})


def cosine_feature_loss(student_feat, teacher_feat, adapter):
    """Mean over positions of 1 - cos(adapter(student) resized to the teacher's size, teacher)."""
    aligned = F.interpolate(adapter(student_feat), size=teacher_feat.shape[-2:], mode="bilinear", align_corners=False)
    return (1 - F.cosine_similarity(aligned.float(), teacher_feat.float(), dim=1)).mean()


def make_compute_loss(criterion, teacher, teacher_dtype, adapters, weights):
    """compute_loss(net, batch) -> (loss, {term: value}) of feature KD with a live teacher; weights: pair -> weight."""
    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        with torch.no_grad(), engine.autocast(batch["image"].device, teacher_dtype):
            _, teacher_feats = teacher(batch["image"].contiguous(memory_format=torch.channels_last),
                                       return_features=True, upsample=False)
        parts = {"ce": criterion(logits, batch["mask"])}
        for s, (t, _, _) in FEATURE_PAIRS.items():
            parts[f"feat_{s}"] = cosine_feature_loss(feats[s], teacher_feats[t], adapters[s])
        loss = parts["ce"] + sum(weights[s] * parts[f"feat_{s}"] for s in FEATURE_PAIRS)
        return loss, parts
    return compute_loss


def main(args):
    run = distill.setup_distillation(args, strategy="feature-kd")
    adapters = build_adapters()
    weights = {"stage16": args.feat_weight, "head": args.final_feat_weight}
    compute_loss = make_compute_loss(run.criterion, run.teacher, run.teacher_dtype, adapters, weights)
    return engine.train(run.student, compute_loss, run.datasets, run.criterion, run.cfg, adapters=adapters)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
