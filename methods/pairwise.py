"""Pair-wise distillation (Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019, its
pair-wise term): both networks' feature maps are max-pooled into a few nodes, and the student's matrix of node-to-node
cosine similarities is pulled towards the teacher's, plus weighted CE.

pairwise_loss: each map max-pooled (kernel = int(size * scale) per side, stride = kernel, ceil mode) into nodes, each
node's feature divided by its L2 norm over the channels (+1e-8), the (nodes x nodes) similarity matrix of each image,
and the squared difference of the teacher's and the student's matrices summed, divided by nodes^2 and by the batch
size (CIRKD's losses, github.com/winycg/CIRKD). The matrices do not depend on channel counts, so no adapter: the
student's head (256 ch, stride 16) is upsampled 2x bilinearly to the FCN head's size (512 ch, stride 8;
distill.HEAD_CHANNELS) before pooling, so both give the same nodes. Scale 0.5: 2 x 2 nodes, the authors' setting.

Default weight 10: CIRKD's --lambda-skd 10 (train_scripts/train_kd/train_skd.sh); its logit KD and adversarial terms
are left out, so the row measures the pair-wise term alone.
"""
import torch
import torch.nn.functional as F

import distill
import flags
from methods import Loss

NAME, TEACHER, TERMS, ORDER = "pairwise", "features", ("ce", "pairwise"), 80
DESCRIPTION = "Train the student with pair-wise (structured) distillation of features."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "pairwise", 10.0, "the pair-wise term", "CIRKD's --lambda-skd")
    parser.add_argument("--pairwise-scale", type=flags.checked(float, lambda v: 0 < v <= 1, "in (0, 1]"),
                        default=0.5, help="pooling kernel as a share of the map's size: 0.5 gives 2 x 2 nodes "
                                          "(default: %(default)s, the authors')")


def node_similarity(feat, scale):
    """(B, nodes, nodes) cosine similarities of the max-pooled nodes of feat (B, C, H, W)."""
    h, w = feat.shape[-2:]
    kernel = (max(int(h * scale), 1), max(int(w * scale), 1))
    nodes = F.max_pool2d(feat.float(), kernel, stride=kernel, ceil_mode=True).flatten(2)  # (B, C, nodes)
    nodes = nodes / (nodes.norm(dim=1, keepdim=True) + 1e-8)
    return torch.bmm(nodes.transpose(1, 2), nodes)


def pairwise_loss(student_feat, teacher_feat, scale=0.5):
    """SKD's pair-wise term: sum of squared differences of the node similarity matrices / nodes^2 / batch size."""
    s = node_similarity(distill.to_teacher_size(student_feat, teacher_feat), scale)
    t = node_similarity(teacher_feat, scale)
    return ((s - t) ** 2).sum() / s.shape[-1] ** 2 / s.shape[0]


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    ce_weight, weight, scale = args.ce_weight, args.pairwise_weight, args.pairwise_scale

    def compute_loss(net, batch):
        logits, feats, _, teacher_feats = distill.both_networks(net, batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        pairwise = pairwise_loss(feats["head"], teacher_feats["head"], scale)
        return ce_weight * ce + weight * pairwise, {"ce": ce, "pairwise": pairwise}
    return Loss(compute_loss)
