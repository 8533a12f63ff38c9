"""Masked Generative Distillation, MGD (Yang et al., ECCV 2022): random positions of the student's (aligned) feature
map are masked out, and a small generator must rebuild the teacher's whole feature map from what is left, so the
student's features learn to carry what the teacher's hold; plus the logit CWD term and weighted CE.

loss = ce_weight * CE_w + mgd_weight * sum((generator(align(student) * keep) - teacher)^2) / N
       + cwd_weight * cwd(student logits, teacher logits, tau)
keep: 0 at each position with probability mgd_mask_ratio (one draw per image and position, shared by the channels).
align: 1x1 conv to the teacher's channels; generator: 3x3 conv, ReLU, 3x3 conv; both train with the student and are
saved as the checkpoint's 'adapters' (not in the deployable model).

Defaults from the authors' segmentation code (github.com/yzd-v/MGD, seg/configs/distillers/mgd/
psp_r101_distill_deepv3_r18_40k_512x512_city.py and seg/mmseg/distillation/): alpha_mgd 2e-5 (--mgd-weight), lambda_mgd
0.75 (--mgd-mask-ratio), use_logit: the logit term of their SegmentationDistiller is CWD at temperature 4, weight 3
(--tau, --cwd-weight; at stride 8 here, as train_cwd.py). Pair: the authors distil the backbones' last stages (R18
layer4, 512 ch -> R101 layer4, 2048 ch); here the last features before each classifier (student head, 256 ch at
stride 16, aligned then upsampled 2x bilinearly -> FCN head, 512 ch at stride 8; distill.HEAD_CHANNELS), because the
generator's two 3x3 convs cost channels^2: at layer4's 2048 channels, 77 G multiply-adds per 256-px image, twice the
whole FCN-ResNet50 forward (35 G; the student's: 0.7 G); at 512 channels 4.8 G (torch.utils.flop_counter). The
summed error grows with the map's size, so alpha_mgd's effect depends on the resolution (the authors: 2048 x 64 x 64
per image; here 512 x 32 x 32 at 256 px).
"""
import torch
import torch.nn as nn

import distill
import flags
from methods import Loss, cwd

NAME, TEACHER, TERMS, ORDER = "mgd", "features", ("ce", "mgd", "cwd"), 70
DESCRIPTION = "Train the student with masked generative distillation (MGD)."


def add_args(parser):
    flags.add_weight(parser, "ce", 1.0, "the label CE term")
    flags.add_weight(parser, "mgd", 2e-5, "the generation term (alpha_mgd)", "the authors' segmentation configs")
    parser.add_argument("--mgd-mask-ratio", type=flags.checked(float, lambda v: 0 <= v < 1, "in [0, 1)"),
                        default=0.75, help="share of the positions masked out (lambda_mgd) (default: %(default)s, the "
                                           "authors' segmentation configs)")
    flags.add_weight(parser, "cwd", 3.0, "the logit CWD term (use_logit)", "the authors' SegmentationDistiller")
    flags.add_tau(parser, 4.0, "the authors' SegmentationDistiller")


def build_modules():
    c_s, c_t = distill.HEAD_CHANNELS["student"], distill.HEAD_CHANNELS["teacher"]
    return nn.ModuleDict({"align": nn.Conv2d(c_s, c_t, 1),
                          "generator": nn.Sequential(nn.Conv2d(c_t, c_t, 3, padding=1), nn.ReLU(inplace=True),
                                                     nn.Conv2d(c_t, c_t, 3, padding=1))})


def random_keep(teacher_feat, mask_ratio):
    """(N, 1, H, W): 0 with probability mask_ratio at each position, else 1 (the authors' torch.rand draw)."""
    n, _, h, w = teacher_feat.shape
    return (torch.rand(n, 1, h, w, device=teacher_feat.device) <= 1 - mask_ratio).to(teacher_feat.dtype)


def mgd_loss(student_feat, teacher_feat, align, generator, keep):
    """sum((generator(align(student) resized to the teacher's size * keep) - teacher)^2) / N (Yang et al. 2022)."""
    generated = generator(distill.to_teacher_size(align(student_feat), teacher_feat) * keep)
    return ((generated.float() - teacher_feat.float()) ** 2).sum() / teacher_feat.shape[0]


def build_loss(args, context):
    criterion, teacher, teacher_dtype = context
    modules = build_modules()
    tau, ce_weight, mgd_weight, mask_ratio, cwd_weight = args.tau, args.ce_weight, args.mgd_weight, \
        args.mgd_mask_ratio, args.cwd_weight

    def compute_loss(net, batch):
        logits, feats, teacher_logits, teacher_feats = distill.both_networks(net, batch, teacher, teacher_dtype)
        ce = criterion(logits, batch["mask"])
        keep = random_keep(teacher_feats["head"], mask_ratio)
        mgd = mgd_loss(feats["head"], teacher_feats["head"], modules["align"], modules["generator"], keep)
        logit = cwd.native_cwd(batch, feats["logits"], teacher_logits, tau)
        return ce_weight * ce + mgd_weight * mgd + cwd_weight * logit, {"ce": ce, "mgd": mgd, "cwd": logit}
    return Loss(compute_loss, modules)
