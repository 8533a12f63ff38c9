"""Feature-based KD: student features, mapped by 1x1 alignment convs to the teacher's channel counts and resized to
its spatial size, are pulled towards the teacher's ResNet50 stage features by a cosine loss, plus weighted CE.

Pairs (student -> teacher): backbone stage at stride 16 (features[12], 112 ch) -> layer3 (1024 ch): both are the
last mid-level stage before the network's final block, holding parts/textures; head pre-classifier features
(256 ch) -> layer4 (2048 ch): both are what each network's classifier reads, so matching them transfers the
teacher's final representation. Teacher features are at stride 8, so the (aligned) student features are upsampled.
loss = CE_w + feat_stage16_weight * (1 - cos) on the mid pair + feat_head_weight * (1 - cos) on the final pair, each
averaged over positions. The alignment convs train with the student, are saved as the checkpoint's 'adapters', and
are not part of the deployable student ('model').
"""
import torch.nn as nn
import torch.nn.functional as F

import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "feature-kd", "features", ("ce", "feat_stage16", "feat_head"), 50
OLD_FLAGS = ("feat_weight", "final_feat_weight")  # their names before the flags were made consistent
DESCRIPTION = "Train the student with feature-based knowledge distillation (cosine)."
FEATURE_PAIRS = {"stage16": ("layer3", 112, 1024), "head": ("layer4", 256, 2048)}  # student: (teacher, c_s, c_t)


def add_args(parser):
    flags.add_weight(parser, "feat_stage16", 0.1, "the cosine loss on stage16 -> layer3")
    flags.add_weight(parser, "feat_head", 0.5, "the cosine loss on head -> layer4")


def build_adapters():
    return nn.ModuleDict({s: nn.Conv2d(c_s, c_t, 1) for s, (_, c_s, c_t) in FEATURE_PAIRS.items()})


def cosine_feature_loss(student_feat, teacher_feat, adapter):
    """Mean over positions of 1 - cos(adapter(student) resized to the teacher's size, teacher)."""
    aligned = distill.to_teacher_size(adapter(student_feat), teacher_feat)
    return (1 - F.cosine_similarity(aligned, teacher_feat.float(), dim=1)).mean()


def make_compute_loss(criterion, teacher, teacher_dtype, adapters, weights):
    """compute_loss(net, batch) -> (loss, {term: value}) of feature KD with a live teacher; weights: pair -> weight."""
    def compute_loss(net, batch):
        logits, feats = net(batch["image"], return_features=True)
        _, teacher_feats = distill.run_teacher(teacher, batch, teacher_dtype, return_features=True, upsample=False)
        parts = {"ce": criterion(logits, batch["mask"])}
        for s, (t, _, _) in FEATURE_PAIRS.items():
            parts[f"feat_{s}"] = cosine_feature_loss(feats[s], teacher_feats[t], adapters[s])
        loss = parts["ce"] + sum(weights[s] * parts[f"feat_{s}"] for s in FEATURE_PAIRS)
        return loss, parts
    return compute_loss


def build_loss(args, context):
    adapters = build_adapters()
    weights = {"stage16": args.feat_stage16_weight, "head": args.feat_head_weight}
    return Loss(make_compute_loss(context.criterion, context.teacher, context.teacher_dtype, adapters, weights),
                adapters)
