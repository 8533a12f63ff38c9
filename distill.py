"""What both distillation scripts share: the frozen teacher (its flags and precision) and the teacher-logit cache.

The cache holds the teacher's stride-8 logits of every training image (resized to --image-size, no augmentation);
at train time each sample's augmentation grid resamples them, so the soft targets follow the crop/scale/flip.
"""
import hashlib
import json
import os
import time
import typing

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import engine
from distributed import init_distributed, log, main_process_first


def add_teacher_args(parser):
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="teacher checkpoint from 'train_baseline.py --model teacher' (default: torchvision's "
                             "COCO_WITH_VOC_LABELS_V1 FCN-ResNet50)")
    parser.add_argument("--teacher-dtype", choices=tuple(engine.PRECISIONS), default=None,
                        help="precision the frozen teacher runs in (autocast for bf16/fp16); part of the teacher-logit "
                             "cache key (default: fp32 on CPU; on CUDA bf16 where supported, else fp16)")
    return parser


def resolve_teacher_dtype(teacher_dtype, device):
    """--teacher-dtype as given, or its default for device: fp32 on CPU, the device's 16-bit type on CUDA."""
    if teacher_dtype is not None:
        return teacher_dtype
    return engine.low_precision(device) if device.type == "cuda" else "fp32"


def build_frozen_teacher(weights, num_classes, device, precision):
    """The teacher (a checkpoint, or torchvision's pretrained weights) in eval mode, no grad, frozen BatchNorm,
    channels_last, on device."""
    if weights is not None:
        loaded = common.load_model(weights, "--teacher-weights", expect_arch="teacher")
        if loaded.num_classes != num_classes:
            raise SystemExit(f"error: --teacher-weights {weights} has {loaded.num_classes} classes but the data has "
                             f"{num_classes}; teacher and student must agree on --num-classes")
        teacher = loaded.model
    else:
        teacher = common.build_teacher(num_classes, pretrained=True)
    teacher.eval().requires_grad_(False)
    log(f"teacher: FCN-ResNet50, {common.count_params(teacher):,} parameters, "
        f"{weights or 'torchvision COCO_WITH_VOC_LABELS_V1'}, runs in {precision}")
    return teacher.to(device, memory_format=torch.channels_last)


class DistillationRun(typing.NamedTuple):
    cfg: engine.TrainConfig
    teacher_dtype: str
    teacher: torch.nn.Module
    student: torch.nn.Module
    datasets: dict
    criterion: torch.nn.Module  # class-weighted CE of the labels


def setup_distillation(args, strategy):
    """The start both KD scripts share: device, the teacher's precision, the run's config, the teacher and the student
    (their weights before any slow data work), the datasets and the class-weighted CE."""
    device = init_distributed(args.device)
    teacher_dtype = resolve_teacher_dtype(args.teacher_dtype, device)
    cfg = engine.setup(args, strategy, teacher_dtype=teacher_dtype)
    teacher = build_frozen_teacher(args.teacher_weights, cfg.data.num_classes, device, teacher_dtype)
    student = common.build_student(cfg.data.num_classes, pretrained=not args.no_pretrained)
    datasets = common.build_datasets(cfg.data)
    class_weights = common.compute_class_weights(datasets["train"])
    criterion = torch.nn.CrossEntropyLoss(weight=class_weights.to(device), ignore_index=common.IGNORE_INDEX)
    return DistillationRun(cfg, teacher_dtype, teacher, student, datasets, criterion)


def state_fingerprint(module):
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherLogitCache:
    """Teacher logits for every training image, at the teacher's native output resolution (stride 8), fp16, in a
    memory-mapped .npy. The teacher sees each image resized to image_size (augmentation off), in `precision`.
    Keyed by teacher weights, its precision, image size and dataset; rebuilt when any changes."""

    def __init__(self, teacher, dataset, device, batch_size, workers, precision):
        self.path = os.path.join(dataset.cache.dir, "teacher_logits.npy")
        self.precision = precision
        key = hashlib.sha1(f"{state_fingerprint(teacher)}|{dataset.image_size}|{dataset.cache.fingerprint}|"
                           f"{len(dataset)}|{precision}".encode()).hexdigest()
        meta_path = self.path[:-4] + ".json"
        self.build_s = 0.0
        with main_process_first():
            meta = json.load(open(meta_path)) if os.path.isfile(meta_path) and os.path.isfile(self.path) else {}
            if meta.get("key") != key:
                t0 = time.perf_counter()
                self._build(teacher, dataset, device, batch_size, workers)
                self.build_s = time.perf_counter() - t0
                common.write_json(meta_path, {"key": key, "teacher_dtype": precision, "build_s": self.build_s})
        self.size_mb = os.path.getsize(self.path) / 2 ** 20
        self._logits = None

    @torch.no_grad()
    def _build(self, teacher, dataset, device, batch_size, workers):
        plain = common.SegmentationDataset(dataset.cache, dataset.image_size, train=True, seed=dataset.seed)
        plain.augment, plain.indices = False, dataset.indices
        loader = engine.make_loader(plain, batch_size, workers)
        out = None
        tmp = self.path[:-4] + ".tmp.npy"
        with common.on_signal_exit("building the teacher-logit cache", cleanup=[tmp]):
            for batch in tqdm(loader, desc="caching teacher logits", leave=False):
                with engine.autocast(device, self.precision):
                    x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
                    logits = teacher(x, upsample=False).float().cpu().numpy().astype(np.float16)
                if out is None:
                    out = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(plain),) + logits.shape[1:])
                out[batch["index"].numpy()] = logits
            out.flush()
            del out
            os.replace(tmp, self.path)

    def __call__(self, i):
        if self._logits is None:  # opened lazily, once per (worker) process
            self._logits = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._logits[i]))


def cached_teacher_logits(batch):
    """Cached native-resolution teacher logits resampled with each sample's augmentation grid (B, C, S, S)."""
    return F.grid_sample(batch["teacher_logits"].float(), batch["grid"], mode="bilinear", padding_mode="border",
                         align_corners=False)  # border: edges replicate exactly as the live teacher's F.interpolate


@torch.no_grad()
def cache_fidelity(teacher, dataset, cache, device, precision, batch_size=8, temperature=1.0):
    """How well the cached, grid-warped logits stand in for the live teacher on augmented training crops: argmax
    agreement over non-ignore pixels and mean KL(p_live || p_cached) per such pixel (softmax at `temperature`)."""
    previous, dataset.teacher_logits = dataset.teacher_logits, cache
    loader = engine.make_loader(dataset, batch_size, 0, shuffle=True, generator=torch.Generator().manual_seed(0))
    agree = kl = pixels = 0.0
    for batch in loader:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        with engine.autocast(device, precision):
            live = teacher(x).float()
        cached = cached_teacher_logits({k: batch[k].to(device) for k in ("teacher_logits", "grid")})
        valid = batch["mask"].to(device) != common.IGNORE_INDEX
        log_live, log_cached = F.log_softmax(live / temperature, 1), F.log_softmax(cached / temperature, 1)
        kl_map = (log_live.exp() * (log_live - log_cached)).sum(1)
        agree += float(((live.argmax(1) == cached.argmax(1)) & valid).sum())
        kl += float(kl_map[valid].sum())
        pixels += float(valid.sum())
    dataset.teacher_logits = previous
    return {"argmax_agreement": agree / pixels, "kl_live_cached": kl / pixels, "pixels": int(pixels)}
