"""What the distillation methods share: the frozen teacher (its flags, precision and forward), the teacher-logit
cache, the teacher's logits at its stride 8 (CWD, DIST), student maps resized to the teacher's, and the KL of softened
distributions.

The cache holds the teacher's stride-8 logits of every training image (resized to --image-size, no augmentation);
at train time each sample's augmentation grid resamples them, so the soft targets follow the crop/scale/flip.
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import engine
import errors
import fileio
from distributed import log, main_process_first


def add_teacher_args(parser):
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="teacher checkpoint from 'train_baseline.py --model teacher' (default: torchvision's "
                             "COCO_WITH_VOC_LABELS_V1 FCN-ResNet50)")
    parser.add_argument("--teacher-dtype", choices=tuple(engine.PRECISIONS), default=None,
                        help="precision the frozen teacher runs in (autocast for bf16/fp16); part of the teacher-logit "
                             "cache key (default: fp32 on CPU; on CUDA bf16 where supported, else fp16)")
    return parser


def add_logit_cache_arg(parser):
    """--no-teacher-cache, for the losses that need only the teacher's logits (response KD, CWD, DIST)."""
    parser.add_argument("--no-teacher-cache", action="store_true",
                        help="run the teacher live on every augmented batch instead of using the logit cache")
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
            raise errors.UserError(f"--teacher-weights {weights} has {loaded.num_classes} classes but the data has "
                                   f"{num_classes}; teacher and student must agree on --num-classes")
        teacher = loaded.model
    else:
        teacher = common.build_teacher(num_classes, pretrained=True)
    teacher.eval().requires_grad_(False)
    log(f"teacher: FCN-ResNet50, {common.count_params(teacher):,} parameters, "
        f"{weights or 'torchvision COCO_WITH_VOC_LABELS_V1'}, runs in {precision}")
    return teacher.to(device, memory_format=torch.channels_last)


def logit_source(teacher, train_set, device, batch_size, workers, teacher_dtype, no_cache):
    """The teacher to run live in the loss, or None: by default its logits come from the teacher-logit cache, built
    if needed and attached to the training set (every batch then carries them)."""
    if no_cache:
        return teacher
    cache = TeacherLogitCache(teacher, train_set, device, batch_size, workers, teacher_dtype)
    log(f"teacher-logit cache {cache.path}: {cache.size_mb:.1f} MB"
        + (f", built in {cache.build_s:.1f}s" if cache.build_s else " (reused)"))
    train_set.teacher_logits = cache
    return None


def run_teacher(teacher, batch, teacher_dtype, **kwargs):
    """The frozen teacher on an augmented batch (no gradient, in its precision), its outputs in fp32: logits, or
    (logits, features) with return_features=True; upsample=False keeps its stride-8 logits."""
    with torch.no_grad(), engine.autocast(batch["image"].device, teacher_dtype):
        out = teacher(batch["image"].contiguous(memory_format=torch.channels_last), **kwargs)
    if isinstance(out, tuple):
        return out[0].float(), {k: v.float() for k, v in out[1].items()}
    return out.float()


def batch_teacher_logits(batch, teacher, teacher_dtype):
    """The teacher's logits (B, C, S, S) for an augmented batch, at its input size: run live when teacher is given
    (upsampled like its own output), else the batch's cached logits warped with each sample's grid."""
    if teacher is None:
        return cached_teacher_logits(batch)
    return run_teacher(teacher, batch, teacher_dtype)


TEACHER_STRIDE = 8  # FCN-ResNet50's output stride


def teacher_native_logits(batch, teacher, teacher_dtype):
    """The teacher's logits at its own output stride 8 (64x fewer positions than the input size), where CWD and DIST
    compare them: run live on the batch (upsample=False), or read from the cache at the centre of each stride-8 cell
    of the augmentation grid."""
    if teacher is None:
        return cached_teacher_logits(batch, cell_grid(batch["grid"]))
    return run_teacher(teacher, batch, teacher_dtype, upsample=False)


# The last features before each network's classifier: the student's head (256 channels, stride 16) and the FCN
# head's (512 channels, stride 8). CIRKD compares networks there (its models' last output, the decoder's feature:
# losses/cwd.py, skd.py, at.py of github.com/winycg/CIRKD), and so do the feature methods mgd, feature-cwd, pairwise
# and at here.
HEAD_CHANNELS = {"student": 256, "teacher": 512}


def both_networks(net, batch, teacher, teacher_dtype):
    """(student logits, student features, teacher stride-8 logits, teacher features) of an augmented batch: the
    student with gradients, the live teacher without."""
    logits, feats = net(batch["image"], return_features=True)
    teacher_logits, teacher_feats = run_teacher(teacher, batch, teacher_dtype, return_features=True, upsample=False)
    return logits, feats, teacher_logits, teacher_feats


def to_teacher_size(student, teacher):
    """A student map (logits or features, stride 16) resized bilinearly (align_corners=False) to the spatial size of
    the teacher's map it is compared with (stride 8: 2x), in fp32."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student.float()
    return F.interpolate(student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def softened_kl(student, teacher, tau, dim=1, keep=None):
    """KL(softmax(teacher / tau) || softmax(student / tau)) along dim, per remaining position (Hinton et al. 2015's
    softened distributions; CWD's spatial ones with dim=-1). keep (bool, broadcastable to the inputs): the entries
    taken into the distributions; the others get probability 0 and add nothing, not even NaN to the gradient."""
    s, t = student.float() / tau, teacher.float() / tau
    if keep is None:
        log_ps, log_pt = F.log_softmax(s, dim=dim), F.log_softmax(t, dim=dim)
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim)
    keep = keep.expand_as(s)
    log_ps = F.log_softmax(s.masked_fill(~keep, float("-inf")), dim=dim).masked_fill(~keep, 0.0)
    log_pt = F.log_softmax(t.masked_fill(~keep, float("-inf")), dim=dim).masked_fill(~keep, 0.0)
    return (log_pt.exp() * keep * (log_pt - log_ps)).sum(dim)


def cell_grid(grid, stride=TEACHER_STRIDE):
    """The sampling grid (B, S, S, 2) at the centres of its stride x stride cells (B, S/stride, S/stride, 2): the mean
    of each cell's grid points, exact since an augmentation grid is affine in the pixel position."""
    cells = F.avg_pool2d(grid.permute(0, 3, 1, 2), stride, ceil_mode=True)
    return cells.permute(0, 2, 3, 1)


def cell_labels(mask, size):
    """The label at each cell centre (nearest), so 255 pixels (boundaries, crop padding) can be left out at stride 8."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def state_fingerprint(module):
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherLogitCache:
    """Teacher logits for every training image, at the teacher's native output resolution (stride 8), fp16, in a
    memory-mapped .npy. The teacher sees each image resized to image_size (augmentation off), in `precision`.
    Keyed by teacher weights, its precision, image size and dataset; rebuilt when any changes or the file fails the
    checksum its metadata records. One process builds it while any others (a sweep, torchrun ranks) wait."""

    def __init__(self, teacher, dataset, device, batch_size, workers, precision):
        self.path = os.path.join(dataset.cache.dir, "teacher_logits.npy")
        self.precision = precision
        key = hashlib.sha1(f"{state_fingerprint(teacher)}|{dataset.image_size}|{dataset.cache.fingerprint}|"
                           f"{len(dataset)}|{precision}".encode()).hexdigest()
        self.build_s = 0.0
        with main_process_first():
            intact, damage = self._check(key)
            if not intact:
                if damage:
                    fileio.warn(f"the teacher-logit cache {self.path} is damaged ({damage}); rebuilding it")
                fileio.make_cache_dir(dataset.cache.dir, damage and f"the teacher-logit cache {self.path} is damaged "
                                                                    f"({damage})")
                with fileio.build_lock(dataset.cache.lock_path):
                    if not self._check(key)[0]:  # (another process may have built it while we waited)
                        self._build(teacher, dataset, device, batch_size, workers, key)
        self.size_mb = os.path.getsize(self.path) / 2 ** 20
        self._logits = None

    def _check(self, key):
        """(True, None) if the cache is current and intact; (False, what is damaged) if it fails its check; (False,
        None) if there is none or it was built for another key."""
        meta_path = self.path[:-4] + ".json"
        if not os.path.exists(meta_path):
            return False, None
        try:
            meta = fileio.read_json(meta_path)
            if meta["key"] != key:
                return False, None
            damage = fileio.check_file(self.path, meta["file"])
        except (ValueError, KeyError, TypeError) as e:
            damage = f"{meta_path}: {e}"
        return damage is None, damage

    @torch.no_grad()
    def _build(self, teacher, dataset, device, batch_size, workers, key):
        t0 = time.perf_counter()
        plain = common.SegmentationDataset(dataset.cache, dataset.image_size, train=True, seed=dataset.seed)
        plain.augment, plain.indices = False, dataset.indices
        loader = engine.make_loader(plain, batch_size, workers)
        out = None
        tmp = f"{self.path[:-4]}.tmp{os.getpid()}.npy"
        with fileio.on_signal_exit("building the teacher-logit cache", cleanup=[tmp]):
            for batch in tqdm(engine.batches(loader), total=len(loader), desc="caching teacher logits", leave=False,
                              disable=None):
                with engine.autocast(device, self.precision):
                    x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
                    logits = teacher(x, upsample=False).float().cpu().numpy().astype(np.float16)
                if out is None:
                    out = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(plain),) + logits.shape[1:])
                out[batch["index"].numpy()] = logits
            out.flush()
            del out
            record = fileio.file_record(tmp)
            os.replace(tmp, self.path)
        self.build_s = time.perf_counter() - t0
        fileio.write_json(self.path[:-4] + ".json", {"key": key, "teacher_dtype": self.precision,
                                                      "build_s": self.build_s, "file": record})

    def _array(self):
        if self._logits is None:  # opened lazily, once per (worker) process
            self._logits = np.load(self.path, mmap_mode="r")
        return self._logits

    def __call__(self, i):
        return torch.from_numpy(np.array(self._array()[i]))

    @property
    def item_bytes(self):
        """Bytes of one image's logits."""
        return int(np.prod(self._array().shape[1:])) * 2

    def stack(self, indices):
        """The logits of images `indices` as one (N, C, h, w) fp16 tensor (the device-resident path uploads it)."""
        return torch.from_numpy(np.array(self._array()[np.asarray(indices)]))


def cached_teacher_logits(batch, grid=None):
    """Cached native-resolution teacher logits resampled with each sample's augmentation grid (B, C, S, S), or with
    another grid of the same crop (e.g. its stride-8 cell centres)."""
    return F.grid_sample(batch["teacher_logits"].float(), batch["grid"] if grid is None else grid, mode="bilinear",
                         padding_mode="border", align_corners=False)  # border: as the live teacher's F.interpolate


@torch.no_grad()
def cache_fidelity(teacher, dataset, cache, device, precision, batch_size=8, temperature=1.0):
    """How well the cached, grid-warped logits stand in for the live teacher on augmented training crops: argmax
    agreement over non-ignore pixels and mean KL(p_live || p_cached) per such pixel (softmax at `temperature`)."""
    previous, dataset.teacher_logits = dataset.teacher_logits, cache
    try:
        return _fidelity(teacher, dataset, device, precision, batch_size, temperature)
    finally:
        dataset.teacher_logits = previous


def _fidelity(teacher, dataset, device, precision, batch_size, temperature):
    loader = engine.make_loader(dataset, batch_size, 0, shuffle=True, generator=torch.Generator().manual_seed(0))
    agree = kl = pixels = 0.0
    for batch in loader:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        with engine.autocast(device, precision):
            live = teacher(x).float()
        cached = cached_teacher_logits({k: batch[k].to(device) for k in ("teacher_logits", "grid")})
        valid = batch["mask"].to(device) != common.IGNORE_INDEX
        kl_map = softened_kl(cached, live, temperature)  # KL(p_live || p_cached) per pixel
        agree += float(((live.argmax(1) == cached.argmax(1)) & valid).sum())
        kl += float(kl_map[valid].sum())
        pixels += float(valid.sum())
    return {"argmax_agreement": agree / pixels, "kl_live_cached": kl / pixels, "pixels": int(pixels)}
