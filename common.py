"""What every script reads: the data a run trains on (which VOC-format folder, augmentation, the dataset and its
config), class weights, the confusion matrix behind mIoU, the teacher and student builders, reading checkpoints.
VOC's own format and files (split lists, reading masks, download, the pixel cache) are in voc.py.

Scripts import this module; importing it does no work.
"""
import dataclasses
import json
import os
import socket
import typing
import urllib.error
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import fileio
import flags
import sbd
import toy_voc
import voc
from distributed import log, main_process_first
from voc import IGNORE_INDEX, VOC_CLASSES  # noqa: F401 (every script reads them here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_data_root(data_dir, toy, download):
    """The VOC-format root for this run: the toy set (generated once) with --toy, else VOC 2012
    under --data-dir, downloaded on first use unless --no-download."""
    if toy:
        return toy_voc.make_toy_voc(os.path.join(data_dir, "toy"))
    root = voc.find_voc_root(data_dir)
    if root is None:
        if not download:
            raise errors.UserError(
                f"no VOC dataset under --data-dir {data_dir} (expected "
                f"VOCdevkit/VOC2012/{{JPEGImages,SegmentationClass,ImageSets/Segmentation}}); "
                f"drop --no-download to fetch it, or pass --toy")
        voc.download_voc(data_dir)
        root = voc.find_voc_root(data_dir)
        if root is None:
            raise errors.UserError(f"{data_dir}: the VOC tar extracted but VOCdevkit/VOC2012 is incomplete; "
                                   f"delete it and run again")
    return root


# ---------------------------------------------------------------------------------------------
# Augmentation as one sampling grid per sample: the same geometry for image, mask and teacher logits
# ---------------------------------------------------------------------------------------------

def crop_box(height, width, size, rng=None, scale_range=(0.5, 2.0)):
    """The augmentation of one sample as (scaled height, scaled width, top, left, flip), in pixels of the scaled image.

    rng=None: plain resize of the whole image to size x size (validation, augmentation off).
    Otherwise: resize so the shorter side is size * s, s ~ U(scale_range), take a random
    size x size window (padding where the image is smaller), flip horizontally with p=0.5."""
    if rng is None:
        return (float(size), float(size), 0.0, 0.0, 0.0)
    r = rng.uniform(*scale_range) * size / min(height, width)
    sh, sw = height * r, width * r
    y0 = rng.uniform(min(0.0, sh - size), max(0.0, sh - size))
    x0 = rng.uniform(min(0.0, sw - size), max(0.0, sw - size))
    return (sh, sw, y0, x0, float(rng.random() < 0.5))


def grids_from_boxes(boxes, size):
    """Normalised sampling grids (B, size, size, 2) for F.grid_sample (align_corners=False) from crop boxes (B, 5),
    a float64 tensor of crop_box() rows, on the boxes' device (the device-resident path builds a batch's there)."""
    steps = torch.arange(size, dtype=torch.float64, device=boxes.device) + 0.5
    sh, sw, y0, x0, flip = (boxes[:, j, None] for j in range(5))
    gy = 2 * (y0 + steps) / sh - 1
    gx = (2 * (x0 + steps) / sw - 1) * (1 - 2 * flip)
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).float()


def sample_grid(height, width, size, rng=None, scale_range=(0.5, 2.0)):
    """Normalised sampling grid (size, size, 2) of one sample's crop_box()."""
    box = torch.tensor([crop_box(height, width, size, rng, scale_range)], dtype=torch.float64)
    return grids_from_boxes(box, size)[0]


def outside_image(grid):
    """Output pixels whose sample point lies outside the source image (padding of a crop)."""
    return (grid.abs() > 1).any(dim=-1)


def warp_image(img_u8, grid):
    """uint8 (H, W, 3) -> normalised float (3, S, S), bilinear; edge pixels replicate like F.interpolate,
    outside the image is black (0 before normalisation)."""
    x = torch.from_numpy(np.array(img_u8)).permute(2, 0, 1)[None].float().div_(255)
    x = F.grid_sample(x, grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    x[:, outside_image(grid)] = 0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def warp_mask(mask_u8, grid):
    """uint8 (H, W) -> int64 (S, S), nearest; outside the image is IGNORE_INDEX."""
    m = torch.from_numpy(np.array(mask_u8))[None, None].float()
    m = F.grid_sample(m, grid[None], mode="nearest", padding_mode="border", align_corners=False)[0, 0].long()
    m[outside_image(grid)] = IGNORE_INDEX
    return m


class SegmentationDataset(torch.utils.data.Dataset):
    """VOC-format split read from a voc.PixelCache.

    train=True: random scale/crop/flip to image_size; items hold image, mask (S, S) and the grid.
    train=False: image resized to image_size; mask at original resolution (or eval_size x eval_size); with scales
    (multi-scale evaluation) also "views": the image resized the same way to scaled_size(image_size, s) per scale."""

    def __init__(self, cache, image_size, train, eval_size=None, seed=0, limit=None, scales=None):
        self.cache, self.image_size, self.train = cache, image_size, train
        self.eval_size, self.seed, self.epoch = eval_size, seed, 0
        self.scales = scales
        self.augment = train
        self.indices = list(range(len(cache) if limit is None else min(limit, len(cache))))
        self.teacher_logits = None  # optional: index -> cached teacher logits (response KD's TeacherLogitCache)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def box(self, i, epoch):
        """The crop_box() of item i (an index into the cache) in epoch: a per-(seed, epoch, item) RNG, so the
        augmentation is the same whatever the workers, ranks, data path or resume."""
        rng = np.random.default_rng([self.seed, epoch, i]) if self.augment else None
        return crop_box(*self.cache.shapes[i], self.image_size, rng)

    def __getitem__(self, k):
        """Item k of the split; k may be (epoch, k), as a sampler that outlives an epoch (persistent workers) gives."""
        epoch, k = k if isinstance(k, tuple) else (self.epoch, k)
        i = self.indices[k]
        img, mask = self.cache.get(i)
        grid = grids_from_boxes(torch.tensor([self.box(i, epoch)], dtype=torch.float64), self.image_size)[0]
        item = {"image": warp_image(img, grid), "index": i}
        if self.scales is not None:
            h, w = img.shape[:2]
            item["views"] = tuple(item["image"] if s == 1 else
                                  warp_image(img, sample_grid(h, w, scaled_size(self.image_size, s)))
                                  for s in self.scales)
        if self.train:
            item["mask"] = warp_mask(mask, grid)
            item["grid"] = grid
        elif self.eval_size:
            item["mask"] = warp_mask(mask, sample_grid(mask.shape[0], mask.shape[1], self.eval_size))
        else:
            item["mask"] = torch.from_numpy(mask.astype(np.int64))
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits(i)
        return item


def scaled_size(image_size, scale):
    """The input size of one scale of multi-scale evaluation: round(image_size * scale)."""
    return round(image_size * scale)


def check_scales(scales, image_size):
    """--scales: every scaled input must be a size the networks take."""
    small = [s for s in scales if scaled_size(image_size, s) < flags.MIN_IMAGE_SIZE]
    if small:
        raise errors.UserError(f"--scales {','.join(f'{s:g}' for s in small)} at --image-size {image_size} gives "
                               f"inputs under {flags.MIN_IMAGE_SIZE} px; use scales >= "
                               f"{flags.MIN_IMAGE_SIZE / image_size:.3g} or a larger --image-size")


def collate(items):
    """Stack everything except masks of different sizes (validation at original resolution); "views" become one
    stacked batch per scale."""
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "mask" and len({tuple(v.shape) for v in values}) > 1:
            batch[key] = values
        elif key == "views":
            batch[key] = [torch.stack(scale) for scale in zip(*values)]
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.tensor(values)
    return batch


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data a run reads and how it is shaped, resolved from the data flags by data_config()."""
    data_dir: str
    toy: bool
    download: bool
    cache_dir: str
    num_classes: int
    image_size: int
    eval_size: int | None
    limit_train: int | None
    limit_val: int | None
    train_set: str
    workers: int
    seed: int


def default_cache_dir():
    """The user's own cache folder ($XDG_CACHE_HOME/voc-kd, else ~/.cache/voc-kd), never the data folder, which may
    be shared or read-only; each dataset gets its own subfolder there (keyed by its path)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "voc-kd")


def data_config(args, trained_image_size=None):
    """DataConfig from the flags of flags.add_data_args (--image-size by the script's rule; trained_image_size: the
    size a checkpoint was trained at, for evaluation)."""
    image_size = args.image_size or flags.default_image_size(args.image_size_rule, args.toy, trained_image_size)
    return DataConfig(data_dir=args.data_dir, toy=args.toy, download=not args.no_download,
                      cache_dir=args.cache_dir or default_cache_dir(), num_classes=args.num_classes,
                      image_size=image_size, eval_size=args.eval_size, limit_train=args.limit_train,
                      limit_val=args.limit_val, train_set=args.train_set, workers=args.workers, seed=args.seed)


def build_datasets(cfg, splits=("train", "val"), augment_train=True, scales=None):
    """dict split -> SegmentationDataset; the train split is augmented unless augment_train=False (evaluation).
    scales (multi-scale evaluation, checked before any work): the evaluated splits also give each scale's input."""
    if scales is not None:
        check_scales(scales, cfg.image_size)
    with main_process_first():
        root = resolve_data_root(cfg.data_dir, cfg.toy, cfg.download)
    out = {}
    for split in splits:
        with main_process_first():
            if split == "train" and cfg.train_set == "trainaug":
                pairs = sbd.trainaug_pairs(root, cfg.data_dir, download=cfg.download)
                cache = voc.PixelCache(root, "trainaug", cfg.cache_dir, cfg.num_classes, pairs=pairs)
            else:
                cache = voc.PixelCache(root, split, cfg.cache_dir, cfg.num_classes)
        train = split == "train" and augment_train
        limit = cfg.limit_train if train else cfg.limit_val
        out[split] = SegmentationDataset(cache, cfg.image_size, train, cfg.eval_size, cfg.seed, limit,
                                         None if train else scales)
    return out


# ---------------------------------------------------------------------------------------------
# Class weights and metrics
# ---------------------------------------------------------------------------------------------

def class_pixel_counts(masks, num_classes):
    counts = np.zeros(num_classes, dtype=np.int64)
    for m in masks:
        counts += np.bincount(m.reshape(-1), minlength=256)[:num_classes]
    return counts


def class_weights_from_counts(counts):
    """ENet weighting (Paszke et al. 2016): w_c = 1 / ln(1.02 + p_c), p_c = n_c / sum_k n_k over
    non-ignore pixels. Inverse-frequency-like but bounded to [~1.4, ~50.5] (50.5 for absent classes)."""
    p = counts / max(int(counts.sum()), 1)
    return 1.0 / np.log(1.02 + p)


def compute_class_weights(dataset):
    """Class weights of the training split's masks (original resolution), cached beside its pixel cache with a
    checksum; built by one process while any others wait, rebuilt if damaged."""
    cache = dataset.cache
    path = os.path.join(cache.dir, "class_weights.json")
    with main_process_first():
        weights, damage = read_class_weights(path, cache.fingerprint)
        if weights is None:
            if damage:
                fileio.warn(f"{damage}; recomputing the class weights")
            fileio.make_cache_dir(cache.dir, damage)
            with fileio.build_lock(cache.lock_path):
                weights, _ = read_class_weights(path, cache.fingerprint)
                if weights is None:
                    counts = class_pixel_counts(cache.masks(), cache.num_classes).tolist()
                    weights = class_weights_from_counts(np.array(counts)).tolist()
                    fileio.write_json(path, {"fingerprint": cache.fingerprint, "formula": "1/ln(1.02 + p_c)",
                                             "pixel_counts": counts, "weights": weights,
                                             "crc32": content_crc32([counts, weights])})
    if (path, cache.fingerprint) not in CLASS_WEIGHTS_SHOWN:  # once per process: compare.py's runs share them
        CLASS_WEIGHTS_SHOWN.add((path, cache.fingerprint))
        log("class weights (1/ln(1.02 + p_c)):", " ".join(f"{w:.2f}" for w in weights))
    return torch.tensor(weights, dtype=torch.float32)


CLASS_WEIGHTS_SHOWN = set()  # (class_weights.json, fingerprint) whose weights this process has printed


def weighted_ce(train_set, device):
    """The label loss of every run: cross-entropy weighted by the training set's class weights, 255 left out."""
    return nn.CrossEntropyLoss(weight=compute_class_weights(train_set).to(device), ignore_index=IGNORE_INDEX)


def content_crc32(obj):
    return zlib.crc32(json.dumps(obj).encode())


def read_class_weights(path, fingerprint):
    """(weights, None) from a current, intact class_weights.json; (None, what is wrong) if damaged; (None, None) if
    absent or computed from other source files."""
    if not os.path.exists(path):
        return None, None
    try:
        saved = fileio.read_json(path)
        if saved["fingerprint"] != fingerprint:
            return None, None
        if content_crc32([saved["pixel_counts"], saved["weights"]]) != saved["crc32"]:
            return None, f"{path} fails its checksum"
        return saved["weights"], None
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{path} is damaged ({e})"


class ConfusionMatrix:
    """Accumulates a num_classes^2 confusion matrix (rows: ground truth, cols: prediction) with
    torch.bincount, ignoring IGNORE_INDEX pixels."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target, pred):
        target, pred = target.reshape(-1), pred.reshape(-1)
        k = (target >= 0) & (target < self.num_classes)
        idx = self.num_classes * target[k].long() + pred[k].long()
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes).cpu()

    def all_reduce(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            t = self.mat.to(dev)
            torch.distributed.all_reduce(t)
            self.mat = t.cpu()

    def compute(self):
        """mIoU, per-class IoU, pixel accuracy, mean class accuracy, in percent (the unit of every figure this repo
        prints or writes), and how many classes the model predicts anywhere (1: one class everywhere, a model that
        has not learnt). Classes absent from both ground truth and prediction have IoU NaN and are left out of the
        means."""
        m = self.mat.double()
        tp = m.diag()
        gt, pred = m.sum(1), m.sum(0)
        iou = 100 * tp / (gt + pred - tp)  # NaN where the class appears nowhere
        acc = 100 * tp / gt
        return {"miou": float(np.nanmean(iou.numpy())) if torch.isfinite(iou).any() else float("nan"),
                "iou_per_class": iou.tolist(),
                "pixel_acc": float(100 * tp.sum() / m.sum()) if m.sum() > 0 else float("nan"),
                "mean_class_acc": float(np.nanmean(acc.numpy())) if torch.isfinite(acc).any() else float("nan"),
                "classes_predicted": int((pred > 0).sum())}


# ---------------------------------------------------------------------------------------------
# Models: pretrained weights, teacher, student, reading checkpoints
# ---------------------------------------------------------------------------------------------

def load_torchvision_weights(weights):
    """State dict of a torchvision Weights enum entry, from TORCH_HOME/hub/checkpoints or downloaded;
    failure is one clear message naming the file and where to put it."""
    import pickle
    filename = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(voc.DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise errors.UserError(f"cannot load pretrained weights {filename} ({e}); download {weights.url} "
                               f"to {path}, or run with --no-pretrained")
    finally:
        socket.setdefaulttimeout(old_timeout)


class Teacher(nn.Module):
    """torchvision FCN-ResNet50 (dilated, output stride 8) that can also return its features: layer3, layer4 and
    head (the FCN head's 512 channels that its last 1x1 conv reads, stride 8). Attribute names match torchvision's
    FCN, so its state_dicts load as they are."""

    def __init__(self, num_classes=21):
        super().__init__()
        from torchvision.models.segmentation import fcn_resnet50
        fcn = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=True)
        self.num_classes = num_classes
        self.backbone = fcn.backbone  # returns {"aux": layer3, "out": layer4}
        self.classifier = fcn.classifier

    def forward(self, x, return_features=False, upsample=True):
        size = x.shape[-2:]
        f = self.backbone(x)
        *body, last = self.classifier  # conv 3x3, BN, ReLU, dropout; then the 1x1 conv that reads their features
        head = f["out"]
        for layer in body:
            head = layer(head)
        logits = last(head)
        if upsample:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits, {"layer3": f["aux"], "layer4": f["out"], "head": head}) if return_features else logits


def _set_num_classes(conv, num_classes):
    return conv if conv.out_channels == num_classes else nn.Conv2d(conv.in_channels, num_classes, 1)


def build_teacher(num_classes=21, pretrained=True):
    """FCN-ResNet50 teacher: COCO_WITH_VOC_LABELS_V1 weights, or random weights (pretrained=False). A classifier for
    another class count starts fresh. (A repo checkpoint: load_model.)"""
    teacher = Teacher(21)
    if pretrained:
        from torchvision.models.segmentation import FCN_ResNet50_Weights
        state = load_torchvision_weights(FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1)
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        teacher.load_state_dict(state)
    teacher.classifier[4] = _set_num_classes(teacher.classifier[4], num_classes)
    teacher.num_classes = num_classes
    return teacher


def build_student(num_classes=21, pretrained=True):
    """LightweightDeepLabV3 with an ImageNet-pretrained MobileNetV3-Large backbone (unless pretrained=False)."""
    from student_model import LightweightDeepLabV3
    student = LightweightDeepLabV3(num_classes)
    if pretrained:
        from torchvision.models import MobileNet_V3_Large_Weights
        state = load_torchvision_weights(MobileNet_V3_Large_Weights.IMAGENET1K_V1)
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        student.backbone.load_state_dict(state)
    return student


def build_model(arch, num_classes, pretrained=True):
    if arch == "teacher":
        return build_teacher(num_classes, pretrained)
    return build_student(num_classes, pretrained)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def read_checkpoint(path, flag="--weights"):
    """The dict stored at path (a repo checkpoint or a bare state_dict). Loaded with weights_only=True: tensors and
    plain Python types only, so a file someone hands you cannot run code; anything else is refused in one line."""
    import pickle
    import zipfile
    if not os.path.isfile(path):
        raise errors.UserError(f"{flag} {path}: no such file")

    def unreadable(reason):
        other = ("start a new run from the weights of another file of that run (best.pth, epoch_NNN.pth) with "
                 "--init-weights PATH" if flag == "--resume" else
                 f"use another checkpoint with {flag} (e.g. the run's best.pth or epoch_NNN.pth)")
        return errors.UserError(f"{flag} {path} is not a readable PyTorch checkpoint ({reason}); it may be "
                                f"truncated: {other}")

    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # torch.save's pre-1.6 format: a pickle stream (protocol >= 2)
    if not (legacy or zipfile.is_zipfile(path)):  # else torch.load calls any other bytes "pickled objects" below
        raise unreadable("neither torch.save's zip archive nor its older pickle format")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise errors.UserError(f"{flag} {path} refused: it holds pickled Python objects beyond tensors and plain "
                               f"types, and loading those could run code ({str(e).splitlines()[0][:160]}); use a "
                               f"checkpoint written by this repo or a plain state_dict")
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise unreadable(str(e).splitlines()[0]) from None
    if not isinstance(ckpt, dict) or not ckpt:
        raise errors.UserError(f"{flag} {path} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict")
    return ckpt


class LoadedModel(typing.NamedTuple):
    model: nn.Module
    arch: str           # "student" or "teacher"
    num_classes: int
    checkpoint: dict    # the whole file (metadata such as "args" and "history" when the repo wrote it)


def load_model(path, flag="--weights", expect_arch=None):
    """The network in any checkpoint this repo writes or a bare state_dict; student vs teacher is read from the
    parameter names. expect_arch: refuse the other architecture."""
    ckpt = read_checkpoint(path, flag)
    state = ckpt["model"] if "model" in ckpt and isinstance(ckpt["model"], dict) else ckpt
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise errors.UserError(f"{flag} {path} is a dict but holds no model weights (no 'model' state_dict)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    if "classifier.weight" in state and "head.0.weight" in state:
        arch, num_classes = "student", state["classifier.weight"].shape[0]
    elif "classifier.4.weight" in state and "backbone.layer4.0.conv1.weight" in state:
        arch, num_classes = "teacher", state["classifier.4.weight"].shape[0]
    else:
        raise errors.UserError(f"{flag} {path} holds weights of an unknown architecture (neither the student "
                               f"LightweightDeepLabV3 nor the FCN-ResNet50 teacher)")
    if expect_arch is not None and arch != expect_arch:
        raise errors.UserError(f"{flag} {path} holds a {arch}, not a {expect_arch} checkpoint")
    try:
        if arch == "teacher":  # built without initialising its 33M weights (a quarter second), then given the file's
            with torch.device("meta"):  # (strict: every parameter and buffer comes from the file, shapes checked)
                model = Teacher(num_classes)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                  assign=True)
        else:
            model = build_student(num_classes, pretrained=False)
            model.load_state_dict(state)
    except RuntimeError as e:
        raise errors.UserError(f"{flag} {path} does not fit the {arch} architecture ({str(e).splitlines()[0]}...)")
    return LoadedModel(model, arch, num_classes, ckpt)
