"""Shared pieces of every script: VOC data (download, toy set, pixel cache, augmentation),
class weights, metrics, teacher/student construction, checkpoints, the training loop, plots.

Scripts import this module; importing it does no work.
"""
import argparse
import contextlib
import copy
import datetime
import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# VOC 2012 trainval tar: the original host first, then the S3 copy torchvision PR #9335 switches to
# (the Oxford server has been down for weeks at a time: pytorch/vision #9269, #9271).
VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_URLS = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "https://d2l-data.s3-accelerate.amazonaws.com/VOCtrainval_11-May-2012.tar",
)
DOWNLOAD_TIMEOUT_S = 15  # connect/read timeout so an offline run fails fast instead of hanging


def voc_palette():
    """The standard 256-entry VOC colour map (bit-interleaved), as a flat list for PIL."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_mask_png(mask, path):
    """Write a class-index mask (H, W) uint8 as a VOC palette PNG."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path, format="PNG")


# ---------------------------------------------------------------------------------------------
# Dataset location, download and the synthetic toy set
# ---------------------------------------------------------------------------------------------

def find_voc_root(data_dir):
    """Return the VOC2012-style folder under data_dir (data_dir/VOCdevkit/VOC2012, data_dir/VOC2012
    or data_dir itself), or None if none has JPEGImages, SegmentationClass and ImageSets."""
    for cand in (os.path.join(data_dir, "VOCdevkit", "VOC2012"), os.path.join(data_dir, "VOC2012"), data_dir):
        if all(os.path.isdir(os.path.join(cand, sub)) for sub in
               ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation"))):
            return cand
    return None


def download_voc(data_dir, urls=VOC_URLS):
    """Fetch and extract VOC 2012 into data_dir with torchvision's downloader (progress bar, md5
    check), trying each mirror; a tar already placed in data_dir is used without any download."""
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    os.makedirs(data_dir, exist_ok=True)
    tar_path = os.path.join(data_dir, VOC_TAR)
    errors = []
    if not check_integrity(tar_path, VOC_MD5):
        if os.path.exists(tar_path):
            errors.append(f"{tar_path}: md5 mismatch (incomplete download?)")
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            for url in urls:
                try:
                    download_url(url, data_dir, filename=VOC_TAR, md5=VOC_MD5, max_redirect_hops=5)
                    if check_integrity(tar_path, VOC_MD5):
                        break
                    errors.append(f"{url}: md5 mismatch")
                except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
                    errors.append(f"{url}: {e}")
        finally:
            socket.setdefaulttimeout(old_timeout)
    if not check_integrity(tar_path, VOC_MD5):
        raise SystemExit(
            f"error: could not download PASCAL VOC 2012 ({'; '.join(errors)}). Download {VOC_TAR} "
            f"(md5 {VOC_MD5}) by hand and put it in {os.path.abspath(data_dir)}/, or put the extracted "
            f"VOCdevkit/ folder there; or run with --toy for the offline synthetic dataset.")
    print(f"extracting {tar_path} ...", file=sys.stderr)
    extract_archive(tar_path, data_dir)


def resolve_data_root(args):
    """The VOC-format root for this run: the toy set (generated once) with --toy, else VOC 2012
    under --data-dir, downloaded on first use unless --no-download."""
    if args.toy:
        return make_toy_voc(os.path.join(args.data_dir, "toy"))
    root = find_voc_root(args.data_dir)
    if root is None:
        if getattr(args, "no_download", False):
            raise SystemExit(
                f"error: no VOC dataset under --data-dir {args.data_dir} (expected "
                f"VOCdevkit/VOC2012/{{JPEGImages,SegmentationClass,ImageSets/Segmentation}}); "
                f"drop --no-download to fetch it, or pass --toy")
        download_voc(args.data_dir)
        root = find_voc_root(args.data_dir)
        if root is None:
            raise SystemExit(f"error: {args.data_dir}: the VOC tar extracted but VOCdevkit/VOC2012 is incomplete; "
                             f"delete it and run again")
    return root


# SBD (Hariharan et al. 2011): 11,355 VOC2011 images with masks as .mat files; with VOC 2012 train and minus VOC 2012
# val it gives the 10,582-image "trainaug" set published VOC results train on.
SBD_URL = "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"


def sbd_root(data_dir, download=True):
    """The SBD 'dataset' folder under data_dir (benchmark_RELEASE/dataset), downloaded with torchvision's code."""
    root = os.path.join(data_dir, "benchmark_RELEASE", "dataset")
    if os.path.isdir(os.path.join(root, "cls")):
        return root
    if not download:
        raise SystemExit(f"error: --train-set trainaug needs SBD at {root}; drop --no-download to fetch it")
    from torchvision.datasets.utils import download_and_extract_archive
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(SBD_URL, data_dir, filename="benchmark.tgz", md5=SBD_MD5)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: could not download SBD ({e}); download benchmark.tgz (md5 {SBD_MD5}) from {SBD_URL} "
                         f"and extract it in {os.path.abspath(data_dir)}/ (giving benchmark_RELEASE/dataset/)")
    finally:
        socket.setdefaulttimeout(old_timeout)
    return root


def trainaug_pairs(voc_root, data_dir, download=True):
    """(id, image, mask) of VOC train + SBD train + SBD val - VOC val. VOC's own masks win where both exist; SBD's
    .mat masks are converted once to palette PNGs under DATA_DIR/SBD_png."""
    root = sbd_root(data_dir, download)
    voc_val = set(read_split_ids(voc_root, "val"))
    sbd_ids = set()
    for split in ("train", "val"):
        with open(os.path.join(root, split + ".txt")) as f:
            sbd_ids.update(line.strip() for line in f if line.strip())
    ids = sorted((set(read_split_ids(voc_root, "train")) | sbd_ids) - voc_val)
    png_dir = os.path.join(data_dir, "SBD_png")
    os.makedirs(png_dir, exist_ok=True)
    pairs = []
    for image_id in ids:
        img_path, mask_path = _pair_paths(voc_root, image_id)
        if not os.path.isfile(img_path):
            img_path = os.path.join(root, "img", image_id + ".jpg")
        if not os.path.isfile(mask_path):
            mask_path = os.path.join(png_dir, image_id + ".png")
            if not os.path.isfile(mask_path):
                mat = os.path.join(root, "cls", image_id + ".mat")
                atomic_write(mask_path, lambda tmp, mat=mat: save_mask_png(read_sbd_mask(mat), tmp))
        pairs.append((image_id, img_path, mask_path))
    return pairs


def read_sbd_mask(path):
    """Class-index mask of an SBD cls/*.mat file (GTcls.Segmentation), as torchvision's SBDataset reads it."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SystemExit("error: reading SBD's .mat masks needs scipy: pip install scipy")
    try:
        return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"error: cannot read SBD mask {path} ({e}); re-extract benchmark.tgz")


TOY_VERSION = 1
TOY_SIZES = {"train": 300, "val": 100}


def _toy_shape(kind, yy, xx, r):
    """Boolean mask of one of five shapes of radius r centred at (0, 0)."""
    if kind == 0:
        return yy ** 2 + xx ** 2 <= r ** 2                               # disc
    if kind == 1:
        return np.maximum(abs(yy), abs(xx)) <= r * 0.85                  # square
    if kind == 2:
        return (yy <= r * 0.7) & (yy >= -r) & (abs(xx) <= (yy + r) * 0.6)  # triangle
    if kind == 3:
        return abs(yy) + abs(xx) <= r                                    # diamond
    return (abs(yy) <= r * 0.3) & (abs(xx) <= r) | (abs(xx) <= r * 0.3) & (abs(yy) <= r)  # cross


def _toy_texture(kind, yy, xx):
    """Multiplicative brightness pattern: solid, horizontal/vertical stripes, checker."""
    if kind == 0:
        return np.ones_like(yy, dtype=np.float32)
    if kind == 1:
        return 0.65 + 0.35 * ((yy // 3) % 2)
    if kind == 2:
        return 0.65 + 0.35 * ((xx // 3) % 2)
    return 0.65 + 0.35 * (((yy // 4) + (xx // 4)) % 2)


def _toy_sample(rng):
    """One synthetic (image, mask): 1-3 objects of classes 1..20 on a cluttered background.
    Class c = hue (c-1)/20 x shape (c-1)%5 x texture (c-1)//5; 255 marks 1-px boundary bands."""
    h, w = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, size=3)
    grad = rng.uniform(-0.6, 0.6, size=(2, 3))
    img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
    for _ in range(int(rng.integers(3, 8))):  # clutter: greyish blobs and bars that stay background
        cy, cx, rr = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 20)
        sel = _toy_shape(int(rng.integers(0, 5)), yy - cy, xx - cx, rr)
        img[sel] = rng.uniform(40, 220) + rng.normal(0, 8, size=3)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(1, 21))
        hue = (c - 1) / 20.0
        rgb = 255 * np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
        r = rng.uniform(12, 30)
        cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
        sel = _toy_shape((c - 1) % 5, yy - cy, xx - cx, r)
        tex = _toy_texture((c - 1) // 5, yy - cy, xx - cx)
        img[sel] = (rgb * rng.uniform(0.75, 1.0))[None] * tex[sel][:, None] + 30 * (1 - tex[sel][:, None])
        mask[sel] = c
    img = np.clip(img + rng.normal(0, 6, size=img.shape), 0, 255).astype(np.uint8)
    pad = np.pad(mask, 1, mode="edge")
    boundary = np.zeros_like(mask, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        boundary |= pad[dy:dy + h, dx:dx + w] != mask
    mask[boundary] = IGNORE_INDEX
    return img, mask


def make_toy_voc(toy_dir, seed=0):
    """Generate (once, deterministically) the synthetic dataset in VOC folder format; returns its root."""
    root = os.path.join(toy_dir, "VOCdevkit", "VOC2012")
    stamp = os.path.join(toy_dir, "COMPLETE")
    if os.path.exists(stamp) and open(stamp).read().strip() == f"toy v{TOY_VERSION} seed {seed}":
        return root
    tmp = toy_dir + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    tmp_root = os.path.join(tmp, "VOCdevkit", "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(tmp_root, sub))
    all_ids = []
    for split, n in TOY_SIZES.items():
        ids = [f"toy_{split}_{i:04d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            img, mask = _toy_sample(np.random.default_rng([seed, 0 if split == "train" else 1, i]))
            Image.fromarray(img).save(os.path.join(tmp_root, "JPEGImages", image_id + ".jpg"), quality=92)
            save_mask_png(mask, os.path.join(tmp_root, "SegmentationClass", image_id + ".png"))
        with open(os.path.join(tmp_root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        all_ids += ids
    with open(os.path.join(tmp_root, "ImageSets", "Segmentation", "trainval.txt"), "w") as f:
        f.write("\n".join(all_ids) + "\n")
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(f"toy v{TOY_VERSION} seed {seed}\n")
    if os.path.exists(toy_dir):
        shutil.rmtree(toy_dir)
    os.replace(tmp, toy_dir)
    return root


# ---------------------------------------------------------------------------------------------
# Reading VOC files and the pixel cache
# ---------------------------------------------------------------------------------------------

def read_split_ids(root, split):
    """Image ids listed in ImageSets/Segmentation/<split>.txt."""
    path = os.path.join(root, "ImageSets", "Segmentation", split + ".txt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: the dataset has no '{split}' split list; "
                         f"check --data-dir / --split")
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise SystemExit(f"error: {path} lists no images")
    return ids


def read_image(path):
    """RGB uint8 array (H, W, 3); a missing or corrupt file is a clear error."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise SystemExit(f"error: cannot read image {path} ({e}); replace or remove it from the split list")


def read_mask(path, num_classes=len(VOC_CLASSES)):
    """Class-index mask (H, W) uint8 from a palette PNG: 0..num_classes-1, 255 = ignore."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise SystemExit(f"error: mask {path} has mode {img.mode}; expected a palette (P) or "
                                 f"grey (L) PNG of class indices")
            mask = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise SystemExit(f"error: cannot read mask {path} ({e}); replace or remove it from the split list")
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise SystemExit(f"error: mask {path} has values {bad[:10].tolist()} outside 0..{num_classes - 1} "
                         f"and {IGNORE_INDEX} (ignore); fix the mask or pass the right --num-classes")
    return mask


def _pair_paths(root, image_id):
    return (os.path.join(root, "JPEGImages", image_id + ".jpg"),
            os.path.join(root, "SegmentationClass", image_id + ".png"))


def split_pairs(root, split):
    """(id, image path, mask path) of every image listed in ImageSets/Segmentation/<split>.txt."""
    return [(image_id, *_pair_paths(root, image_id)) for image_id in read_split_ids(root, split)]


def _fingerprint(pairs):
    """Hash of the split's file names, sizes and mtimes: any change to the source rebuilds caches."""
    h = hashlib.sha1()
    for image_id, *paths in pairs:
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise SystemExit(f"error: {path} is listed in the split but missing; restore it or "
                                 f"remove '{image_id}' from the ImageSets list")
            h.update(f"{image_id}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def atomic_write(path, write_fn):
    """Write via a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SystemExit(f"error: no space left on the device writing {path}; the previous version of it is "
                             f"intact. Free some space, then continue with --resume")
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


class PixelCache:
    """Decoded images and masks of one split at original resolution, as two flat uint8 memmaps
    plus an index. Built once; rebuilt when the source fingerprint changes."""

    def __init__(self, root, split, cache_dir, num_classes=len(VOC_CLASSES), pairs=None):
        self.pairs = pairs if pairs is not None else split_pairs(root, split)
        self.ids = [image_id for image_id, _, _ in self.pairs]
        fingerprint = _fingerprint(self.pairs)
        tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
        self.dir = os.path.join(cache_dir, f"pixels-{tag}-{split}")
        index_path = os.path.join(self.dir, "index.json")
        index = None
        if os.path.isfile(index_path):
            with open(index_path) as f:
                index = json.load(f)
            if index.get("fingerprint") != fingerprint or index.get("num_classes") != num_classes:
                index = None
        if index is None:
            index = self._build(root, fingerprint, num_classes)
        self.fingerprint = fingerprint
        self.shapes = [tuple(s) for s in index["shapes"]]
        self.img_offsets = np.array(index["img_offsets"], dtype=np.int64)
        self.mask_offsets = np.array(index["mask_offsets"], dtype=np.int64)
        self._images = self._masks = None  # opened lazily, once per (worker) process

    def _build(self, root, fingerprint, num_classes):
        os.makedirs(self.dir, exist_ok=True)
        shapes = []
        for _, img_path, _ in self.pairs:  # first pass: sizes only (headers), to size the memmaps
            try:
                with Image.open(img_path) as im:
                    shapes.append((im.height, im.width))
            except (OSError, SyntaxError) as e:
                raise SystemExit(f"error: cannot read image {img_path} ({e}); replace it or remove it from the split list")
        sizes = np.array([h * w for h, w in shapes], dtype=np.int64)
        mask_offsets = np.concatenate([[0], np.cumsum(sizes)])
        img_offsets = mask_offsets * 3
        images = np.lib.format.open_memmap(os.path.join(self.dir, "images.tmp.npy"), "w+", np.uint8, (int(img_offsets[-1]),))
        masks = np.lib.format.open_memmap(os.path.join(self.dir, "masks.tmp.npy"), "w+", np.uint8, (int(mask_offsets[-1]),))
        for i, (_, img_path, mask_path) in enumerate(tqdm(self.pairs, desc=f"caching {os.path.basename(self.dir)}",
                                                          leave=False)):
            img, mask = read_image(img_path), read_mask(mask_path, num_classes)
            if img.shape[:2] != mask.shape or img.shape[:2] != shapes[i]:
                raise SystemExit(f"error: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} "
                                 f"is {img.shape[1]}x{img.shape[0]}; masks must match their images")
            images[img_offsets[i]:img_offsets[i + 1]] = img.reshape(-1)
            masks[mask_offsets[i]:mask_offsets[i + 1]] = mask.reshape(-1)
        images.flush()
        masks.flush()
        del images, masks
        os.replace(os.path.join(self.dir, "images.tmp.npy"), os.path.join(self.dir, "images.npy"))
        os.replace(os.path.join(self.dir, "masks.tmp.npy"), os.path.join(self.dir, "masks.npy"))
        index = {"fingerprint": fingerprint, "num_classes": num_classes, "ids": self.ids, "shapes": shapes,
                 "img_offsets": img_offsets.tolist(), "mask_offsets": mask_offsets.tolist()}
        write_json(os.path.join(self.dir, "index.json"), index)  # written last: marks the cache complete
        return index

    def __len__(self):
        return len(self.ids)

    def get(self, i):
        """(image (H, W, 3) uint8, mask (H, W) uint8) of item i, views into the memmaps."""
        if self._images is None:
            self._images = np.load(os.path.join(self.dir, "images.npy"), mmap_mode="r")
            self._masks = np.load(os.path.join(self.dir, "masks.npy"), mmap_mode="r")
        h, w = self.shapes[i]
        img = self._images[self.img_offsets[i]:self.img_offsets[i + 1]].reshape(h, w, 3)
        mask = self._masks[self.mask_offsets[i]:self.mask_offsets[i + 1]].reshape(h, w)
        return img, mask

    def masks(self):
        """Iterate over all masks (for class statistics)."""
        for i in range(len(self)):
            yield self.get(i)[1]


# ---------------------------------------------------------------------------------------------
# Augmentation as one sampling grid per sample: the same geometry for image, mask and teacher logits
# ---------------------------------------------------------------------------------------------

def sample_grid(height, width, size, rng=None, scale_range=(0.5, 2.0)):
    """Normalised sampling grid (size, size, 2) for F.grid_sample (align_corners=False).

    rng=None: plain resize of the whole image to size x size (validation, augmentation off).
    Otherwise: resize so the shorter side is size * s, s ~ U(scale_range), take a random
    size x size window (padding where the image is smaller), flip horizontally with p=0.5."""
    steps = (torch.arange(size, dtype=torch.float32) + 0.5)
    if rng is None:
        gy = 2 * steps / size - 1
        gx = gy
    else:
        r = rng.uniform(*scale_range) * size / min(height, width)
        sh, sw = height * r, width * r
        y0 = rng.uniform(min(0.0, sh - size), max(0.0, sh - size))
        x0 = rng.uniform(min(0.0, sw - size), max(0.0, sw - size))
        gy = 2 * (y0 + steps) / sh - 1
        gx = 2 * (x0 + steps) / sw - 1
        if rng.random() < 0.5:
            gx = -gx
    return torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)


def _outside(grid):
    """Output pixels whose sample point lies outside the source image (padding of a crop)."""
    return (grid.abs() > 1).any(dim=-1)


def warp_image(img_u8, grid):
    """uint8 (H, W, 3) -> normalised float (3, S, S), bilinear; edge pixels replicate like F.interpolate,
    outside the image is black (0 before normalisation)."""
    x = torch.from_numpy(np.array(img_u8)).permute(2, 0, 1)[None].float().div_(255)
    x = F.grid_sample(x, grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    x[:, _outside(grid)] = 0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def warp_mask(mask_u8, grid):
    """uint8 (H, W) -> int64 (S, S), nearest; outside the image is IGNORE_INDEX."""
    m = torch.from_numpy(np.array(mask_u8))[None, None].float()
    m = F.grid_sample(m, grid[None], mode="nearest", padding_mode="border", align_corners=False)[0, 0].long()
    m[_outside(grid)] = IGNORE_INDEX
    return m


class SegmentationDataset(torch.utils.data.Dataset):
    """VOC-format split read from a PixelCache.

    train=True: random scale/crop/flip to image_size; items hold image, mask (S, S) and the grid.
    train=False: image resized to image_size; mask at original resolution (or eval_size x eval_size)."""

    def __init__(self, cache, image_size, train, eval_size=None, seed=0, limit=None):
        self.cache, self.image_size, self.train = cache, image_size, train
        self.eval_size, self.seed, self.epoch = eval_size, seed, 0
        self.augment = train
        self.indices = list(range(len(cache) if limit is None else min(limit, len(cache))))
        self.extra = None  # optional per-item tensors (e.g. cached teacher logits), indexed like the cache

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        img, mask = self.cache.get(i)
        # per-(seed, epoch, item) RNG: identical augmentation whatever the workers/ranks/resume
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment else None
        grid = sample_grid(img.shape[0], img.shape[1], self.image_size, rng)
        item = {"image": warp_image(img, grid), "index": i}
        if self.train:
            item["mask"] = warp_mask(mask, grid)
            item["grid"] = grid
        elif self.eval_size:
            item["mask"] = warp_mask(mask, sample_grid(mask.shape[0], mask.shape[1], self.eval_size))
        else:
            item["mask"] = torch.from_numpy(mask.astype(np.int64))
        if self.extra is not None:
            item["extra"] = self.extra(i)
        return item


def collate(items):
    """Stack everything except masks of different sizes (validation at original resolution)."""
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "mask" and len({tuple(v.shape) for v in values}) > 1:
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.tensor(values)
    return batch


def build_datasets(args, splits=("train", "val")):
    """Datasets for the requested splits (dict split -> dataset) and the data root."""
    with main_process_first():
        root = resolve_data_root(args)
    out = {}
    for split in splits:
        with main_process_first():
            if split == "train" and getattr(args, "train_set", "train") == "trainaug":
                pairs = trainaug_pairs(root, args.data_dir, download=not args.no_download)
                cache = PixelCache(root, "trainaug", args.cache_dir, args.num_classes, pairs=pairs)
            else:
                cache = PixelCache(root, split, args.cache_dir, args.num_classes)
        train = split == "train" and not getattr(args, "eval_only", False)
        limit = getattr(args, "limit_train" if train else "limit_val", None)
        out[split] = SegmentationDataset(cache, args.image_size, train, args.eval_size, args.seed, limit)
    return out, root


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
    """Class weights of the training split's masks (original resolution), cached in the pixel cache."""
    cache = dataset.cache
    path = os.path.join(cache.dir, "class_weights.json")
    with main_process_first():
        if not (os.path.isfile(path) and json.load(open(path)).get("fingerprint") == cache.fingerprint):
            counts = class_pixel_counts(cache.masks(), dataset_num_classes(dataset))
            write_json(path, {"fingerprint": cache.fingerprint, "formula": "1/ln(1.02 + p_c)",
                              "pixel_counts": counts.tolist(), "weights": class_weights_from_counts(counts).tolist()})
    with open(path) as f:
        weights = torch.tensor(json.load(f)["weights"], dtype=torch.float32)
    log("class weights (1/ln(1.02 + p_c)):", " ".join(f"{w:.2f}" for w in weights.tolist()))
    return weights


def dataset_num_classes(dataset):
    with open(os.path.join(dataset.cache.dir, "index.json")) as f:
        return json.load(f)["num_classes"]


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
        """mIoU, per-class IoU, pixel accuracy, mean class accuracy. Classes absent from both
        ground truth and prediction have IoU NaN and are left out of the means."""
        m = self.mat.double()
        tp = m.diag()
        gt, pred = m.sum(1), m.sum(0)
        iou = tp / (gt + pred - tp)  # NaN where the class appears nowhere
        acc = tp / gt
        return {"miou": float(np.nanmean(iou.numpy())) if torch.isfinite(iou).any() else float("nan"),
                "iou_per_class": iou.tolist(),
                "pixel_acc": float(tp.sum() / m.sum()) if m.sum() > 0 else float("nan"),
                "mean_class_acc": float(np.nanmean(acc.numpy())) if torch.isfinite(acc).any() else float("nan")}


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
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise SystemExit(f"error: cannot load pretrained weights {filename} ({e}); download {weights.url} "
                         f"to {path}, or run with --no-pretrained")
    finally:
        socket.setdefaulttimeout(old_timeout)


class Teacher(nn.Module):
    """torchvision FCN-ResNet50 (dilated, output stride 8) that can also return its layer3/layer4
    features. Attribute names match torchvision's FCN, so its state_dicts load as they are."""

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
        logits = self.classifier(f["out"])
        if upsample:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits, {"layer3": f["aux"], "layer4": f["out"]}) if return_features else logits


def _set_num_classes(conv, num_classes):
    return conv if conv.out_channels == num_classes else nn.Conv2d(conv.in_channels, num_classes, 1)


def build_teacher(num_classes=21, pretrained=True, weights_path=None):
    """FCN-ResNet50 teacher: COCO_WITH_VOC_LABELS_V1 weights, a repo checkpoint (weights_path),
    or random weights (pretrained=False). A classifier for another class count starts fresh."""
    if weights_path is not None:
        model, arch, ckpt_classes, _ = load_model(weights_path)
        if arch != "teacher":
            raise SystemExit(f"error: --teacher-weights {weights_path} holds a {arch}, not a teacher checkpoint")
        if ckpt_classes != num_classes:
            raise SystemExit(f"error: --teacher-weights {weights_path} has {ckpt_classes} classes but the data has "
                             f"{num_classes}; teacher and student must agree on --num-classes")
        return model
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


def read_checkpoint(path):
    """The dict stored at path (a repo checkpoint or a bare state_dict); clear errors otherwise."""
    import pickle
    import zipfile
    if not os.path.isfile(path):
        raise SystemExit(f"error: --weights {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise SystemExit(f"error: {path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]}); "
                         f"it may be truncated: use another checkpoint (e.g. the run's best.pth or epoch_NNN.pth)")
    if not isinstance(ckpt, dict) or not ckpt:
        raise SystemExit(f"error: {path} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict")
    return ckpt


def load_model(path):
    """(model, arch, num_classes, checkpoint dict) from any checkpoint this repo writes or a bare
    state_dict; student vs teacher is read from 'arch' or detected from the parameter names."""
    ckpt = read_checkpoint(path)
    state = ckpt["model"] if "model" in ckpt and isinstance(ckpt["model"], dict) else ckpt
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: {path} is a dict but holds no model weights (no 'model' state_dict)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    if "classifier.weight" in state and "head.0.weight" in state:
        arch, num_classes = "student", state["classifier.weight"].shape[0]
    elif "classifier.4.weight" in state and "backbone.layer4.0.conv1.weight" in state:
        arch, num_classes = "teacher", state["classifier.4.weight"].shape[0]
    else:
        raise SystemExit(f"error: {path} holds weights of an unknown architecture (neither the student "
                         f"LightweightDeepLabV3 nor the FCN-ResNet50 teacher)")
    model = Teacher(num_classes) if arch == "teacher" else build_student(num_classes, pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"error: {path} does not fit the {arch} architecture ({str(e).splitlines()[0]}...)")
    return model, arch, num_classes, ckpt


# ---------------------------------------------------------------------------------------------
# Distributed (torchrun) helpers
# ---------------------------------------------------------------------------------------------

def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def log(*parts):
    """print() on rank 0 only."""
    if is_main():
        print(*parts, flush=True)


def init_distributed(args):
    """Join the process group when started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): NCCL on CUDA, gloo on CPU.
    Returns the device of this process."""
    want_cuda = args.device != "cpu" and (args.device or "").startswith("cuda") or (args.device is None and torch.cuda.is_available())
    if "RANK" not in os.environ or is_distributed():
        if is_distributed():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if want_cuda else "cpu")
        return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if want_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
    return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if want_cuda else "cpu")


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. builds a cache), the other ranks after it (and find it built)."""
    if not is_main():
        torch.distributed.barrier()
    yield
    if is_distributed() and is_main():
        torch.distributed.barrier()


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes (returns it unchanged in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_gradients(optimizer):
    """All-reduce and average the gradients of every parameter: DDP's synchronisation, without wrapping the model
    (the scripts' losses call the model directly, and run the student with return_features)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def broadcast_buffers(module):
    """Rank 0's BatchNorm statistics on every rank, so all ranks evaluate (and save) the same model."""
    if is_distributed():
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


# ---------------------------------------------------------------------------------------------
# Command-line flags shared by the scripts
# ---------------------------------------------------------------------------------------------

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_data_args(parser):
    """Flags that say which data to read (every script that touches data)."""
    parser.add_argument("--data-dir", default="./data", help="folder holding VOCdevkit/VOC2012 (downloaded here "
                        "on first use) and, with --toy, the synthetic set (default: %(default)s)")
    parser.add_argument("--toy", action="store_true", help="use the synthetic VOC-format dataset generated under "
                        "DATA_DIR/toy (offline, small; default: real VOC 2012)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading VOC if it is missing")
    parser.add_argument("--cache-dir", default=None, help="where decoded pixels and class weights are cached "
                        "(default: DATA_DIR/cache)")
    parser.add_argument("--num-classes", type=positive_int, default=len(VOC_CLASSES),
                        help="classes in the masks, background included (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="network input size: training crops and validation resize (default: 256; 128 with --toy)")
    parser.add_argument("--eval-size", type=positive_int, default=None, help="compute metrics on masks resized to "
                        "N x N instead of at each image's original resolution (default: original)")
    parser.add_argument("--limit-val", type=positive_int, default=None, help="use only the first N val images")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loader worker processes (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def add_training_args(parser, default_epochs=50):
    """Flags of the shared training loop (every train_*.py)."""
    add_data_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=default_epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default: %(default)s)")
    parser.add_argument("--lr-factor", type=positive_float, default=0.5,
                        help="ReduceLROnPlateau factor on val mIoU (default: %(default)s)")
    parser.add_argument("--lr-patience", type=int, default=5,
                        help="ReduceLROnPlateau patience in epochs (default: %(default)s)")
    parser.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N train images")
    parser.add_argument("--train-set", choices=("train", "trainaug"), default="train",
                        help="VOC 2012 train (1,464 images) or trainaug: + SBD, minus VOC val (10,582) (default: %(default)s)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="start from random weights instead of torchvision's pretrained ones")
    parser.add_argument("--out-dir", default=None,
                        help="run folder for checkpoints, history and plots (default: checkpoints/<strategy>_<time>)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue a run from PATH (no PATH: OUT_DIR/last.pth)")
    parser.add_argument("--save-every", type=positive_int, default=5,
                        help="also keep epoch_NNN.pth every N epochs (default: %(default)s)")
    add_amp_arg(parser)
    parser.add_argument("--accumulate", type=positive_int, default=1, help="optimizer step every N batches, "
                        "gradients accumulated: batch 16 as 4 x 4 on a small GPU (default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="train in channels_last memory format "
                        "(faster convolutions on recent GPUs)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="synchronise BatchNorm statistics across torchrun processes (CUDA only)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip batches whose loss is NaN/inf (default: stop the run, naming the batch and term)")
    return parser


# ---------------------------------------------------------------------------------------------
# Run set-up, checkpoints, plots
# ---------------------------------------------------------------------------------------------

def setup_run(args, strategy):
    """Pick the device, seed everything, resolve --cache-dir/--out-dir/--resume; returns the device."""
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.data_dir, "cache")
    if args.image_size is None:
        args.image_size = 128 if args.toy else 256
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} but CUDA is not available here; use --device cpu")
    device = init_distributed(args)
    if hasattr(args, "amp"):  # the precision is a recorded choice (config.json), never a side effect of the host
        args.amp = resolve_amp(args.amp, device)
    if hasattr(args, "teacher_dtype"):
        args.teacher_dtype = resolve_teacher_dtype(args.teacher_dtype, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if not hasattr(args, "out_dir"):
        return device
    if args.resume:  # an explicit checkpoint path decides the run folder unless --out-dir says otherwise
        if not os.path.isfile(args.resume):
            raise SystemExit(f"error: --resume {args.resume}: no such checkpoint")
        args.out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    if args.out_dir is None:
        if args.resume is not None:
            raise SystemExit("error: --resume without PATH needs --out-dir (the run folder holding last.pth)")
        args.out_dir = os.path.join("checkpoints", f"{strategy}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if is_distributed():  # every rank must use rank 0's timestamp
            holder = [args.out_dir]
            torch.distributed.broadcast_object_list(holder, src=0)
            args.out_dir = holder[0]
    if args.resume == "":
        args.resume = os.path.join(args.out_dir, "last.pth")
        if not os.path.isfile(args.resume):
            raise SystemExit(f"error: --resume: {args.resume} does not exist; nothing to resume in --out-dir {args.out_dir}")
    elif args.resume is None and os.path.isfile(os.path.join(args.out_dir, "last.pth")):
        raise SystemExit(f"error: --out-dir {args.out_dir} already holds a run (last.pth); pass --resume to "
                         f"continue it or choose another --out-dir")
    if getattr(args, "sync_bn", False) and device.type != "cuda":
        raise SystemExit("error: --sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    os.makedirs(args.out_dir, exist_ok=True)
    args.strategy = strategy
    return device


def save_checkpoint(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src, dst):
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def plot_history(history, out_dir):
    """loss.png and miou.png of a run, drawn from its history (as written to history.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    for key in sorted(history[-1]):
        if key.startswith("train_loss_"):
            ax.plot(epochs, [h[key] for h in history], ".--", label=key.replace("train_loss_", "train: "))
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss (weighted CE)")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * h["val_miou"] for h in history], "o-", label="val mIoU")
    ax.plot(epochs, [100 * h["val_pixel_acc"] for h in history], "s--", label="val pixel acc")
    ax.set(xlabel="epoch", ylabel="%", title="Validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "miou.png"), dpi=100)
    plt.close(fig)


def plot_runs_miou(histories, path):
    """Val mIoU per epoch of several runs ({label: history}) in one chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        ax.plot([h["epoch"] for h in history], [100 * h["val_miou"] for h in history], "o-", label=label)
    ax.set(xlabel="epoch", ylabel="val mIoU (%)", title="Validation mIoU per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Evaluation and the training loop
# ---------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def low_precision(device):
    """The 16-bit type a device runs best: bf16 on CUDA where supported (else fp16), bf16 on CPU (native on
    AVX512-BF16/AMX CPUs, emulated elsewhere, with the same rounding either way)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def resolve_amp(amp, device):
    """--amp as given ('auto', 'bf16', 'fp16' or None) -> the autocast type this run uses ('fp32' = off)."""
    if amp is None:
        return "fp32"
    return low_precision(device) if amp == "auto" else amp


def autocast(device, precision):
    """Autocast to precision ('bf16'/'fp16') on device; 'fp32' (or None) runs in full precision."""
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def add_amp_arg(parser):
    parser.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"), default=None,
                        help="mixed precision (autocast): bf16, or fp16 with a gradient scaler; --amp alone picks bf16 "
                             "where the device supports it (CPU, recent GPUs), else fp16 (default: off, fp32)")
    return parser


def make_loader(dataset, batch_size, workers, shuffle=False, generator=None, skip_batches=0):
    """Batches of dataset; shuffle uses generator's permutation (drop_last), of which the first skip_batches
    batches are left out (resuming inside an epoch gives exactly the batches the interrupted run had left)."""
    world, r = world_size(), rank()
    drop_last = shuffle and len(dataset) > batch_size * world
    if shuffle:  # one permutation for all ranks; rank r takes every world-th index (DistributedSampler's split)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        if drop_last:
            order = order[:len(order) // (batch_size * world) * batch_size * world]
        sampler = order[r::world][skip_batches * batch_size:]
    else:
        sampler = list(range(r, len(dataset), world))
    # an explicit generator also keeps the loader from drawing its worker seed from the global RNG, which would
    # shift dropout's random stream between an uninterrupted and a resumed run
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate, drop_last=drop_last, pin_memory=False,
                                       generator=generator if generator is not None else torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(model, loader, device, num_classes, criterion=None, precision="fp32", on_prediction=None):
    """Metrics of model over loader. Logits are resized to each mask's size (the image's original
    resolution unless --eval-size) before argmax. on_prediction(index, pred uint8 HxW) sees each image."""
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    loss_sum, n = 0.0, 0
    for batch in loader:
        with autocast(device, precision):
            logits = model(batch["image"].to(device, non_blocking=True)).float()
        masks = batch["mask"] if isinstance(batch["mask"], list) else list(batch["mask"])
        for j, mask in enumerate(masks):
            mask = mask.to(device)
            up = F.interpolate(logits[j:j + 1], size=mask.shape[-2:], mode="bilinear", align_corners=False)
            pred = up.argmax(1)[0]
            confmat.update(mask, pred)
            if criterion is not None and (mask != IGNORE_INDEX).any():
                loss_sum += float(criterion(up, mask[None]))
            n += 1
            if on_prediction is not None:
                on_prediction(int(batch["index"][j]), pred.to(torch.uint8).cpu().numpy())
    confmat.all_reduce()
    metrics = confmat.compute()
    loss_sum, n = all_reduce_sum([loss_sum, n], device)
    metrics["loss"] = loss_sum / max(n, 1)
    metrics["num_images"] = int(n)
    metrics["confusion"] = confmat.mat
    return metrics


def format_epoch(rec):
    parts = " ".join(f"{k[len('train_loss_'):]} {v:.4f}" for k, v in rec.items() if k.startswith("train_loss_"))
    return (f"epoch {rec['epoch']:3d} | train loss {rec['train_loss']:.4f} ({parts}) | val loss {rec['val_loss']:.4f} "
            f"mIoU {100 * rec['val_miou']:.2f} pixel acc {100 * rec['val_pixel_acc']:.2f} | lr {rec['lr']:.2e} | "
            f"{rec['epoch_s']:.1f}s {rec['train_img_s']:.1f} img/s data wait {100 * rec['data_wait_frac']:.0f}%")


class StopRequest:
    """SIGINT/SIGTERM while training: the first lets the loop finish its batch, save a resumable checkpoint and
    exit; a second exits at once."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: saving a resumable checkpoint after this batch (send it again to exit at once)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def new_progress():
    """Running state of one epoch; saved in a checkpoint when a run is interrupted inside an epoch."""
    return {"step": 0, "totals": {}, "n_images": 0, "wait": 0.0, "seconds": 0.0, "skipped": 0}


def train_one_epoch(model, compute_loss, loader, optimizer, device, precision, epoch, scaler, progress,
                    stop=None, skip_nonfinite=False, accumulate=1, channels_last=False):
    """Train over loader, continuing progress (new_progress() or a resumed one). The optimizer steps every
    `accumulate` batches (gradients averaged over ranks first); a stop request is honoured at such a step."""
    model.train()
    t0 = time.perf_counter()
    end = progress["step"] + len(loader)
    bar = tqdm(total=end, initial=progress["step"], desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not is_main())
    t_wait = time.perf_counter()
    for batch in loader:
        progress["wait"] += time.perf_counter() - t_wait
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss, parts = compute_loss(batch)
        step = progress["step"]
        progress["step"] += 1
        if all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0], device)[0] > 0:  # all ranks agree to stop/skip
            bad = ", ".join(k for k, v in parts.items() if not torch.isfinite(v)) or "total (on another rank)"
            if not skip_nonfinite:
                raise SystemExit(f"error: non-finite loss at epoch {epoch} batch {step} (terms: {bad}); the last good "
                                 f"checkpoint is kept. Lower --lr, check the data, or pass --skip-nonfinite")
            warnings.warn(f"skipping batch {step} of epoch {epoch}: non-finite loss (terms: {bad})")
            progress["skipped"] += 1
        else:
            ((scaler.scale(loss) if scaler is not None else loss) / accumulate).backward()
            bs = batch["image"].shape[0]
            progress["n_images"] += bs
            for k, v in {"loss": loss, **parts}.items():
                progress["totals"][k] = progress["totals"].get(k, 0.0) + float(v.detach()) * bs
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}",
                        img_s=f"{progress['n_images'] / (progress['seconds'] + time.perf_counter() - t0):.1f}")
        bar.update()
        if progress["step"] % accumulate == 0 or progress["step"] == end:
            if is_distributed():
                average_gradients(optimizer)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if stop is not None and all_reduce_sum([1.0 if stop.signal else 0.0], device)[0] > 0:
                break  # every rank stops after the same optimizer step
        t_wait = time.perf_counter()
    bar.close()
    progress["seconds"] += time.perf_counter() - t0
    return progress


def epoch_stats(progress):
    n, seconds = max(progress["n_images"], 1), max(progress["seconds"], 1e-9)
    stats = {("train_loss" if k == "loss" else f"train_loss_{k}"): v / n for k, v in progress["totals"].items()}
    stats.update(train_s=seconds, train_img_s=progress["n_images"] / seconds,
                 data_wait_frac=progress["wait"] / seconds, skipped_batches=progress["skipped"])
    return stats


def fit(args, model, compute_loss, datasets, criterion, device, extra_modules=None):
    """The shared loop: Adam + ReduceLROnPlateau(val mIoU), checkpoints (last/periodic/best, atomic),
    history.json, plots, exact --resume (also from inside an epoch after SIGINT/SIGTERM).
    compute_loss(batch) -> (loss, {term: value}); extra_modules (e.g. distillation adapters) train with the
    model and are saved beside it."""
    arch = "teacher" if isinstance(model, Teacher) else "student"
    extra = extra_modules if extra_modules is not None else nn.ModuleDict()
    params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_factor,
                                                           patience=args.lr_patience)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None  # bf16 has fp32's range: no scaling
    start_epoch, best_miou, history, partial = 0, -1.0, [], None
    if args.resume:
        ckpt = read_checkpoint(args.resume)
        for key, have in (("arch", arch), ("num_classes", args.num_classes), ("strategy", args.strategy)):
            was = ckpt.get(key) if key != "strategy" else ckpt.get("args", {}).get("strategy")
            if was != have:
                raise SystemExit(f"error: --resume {args.resume} is a run with {key}={was}, this one has {key}={have}; "
                                 f"resume with the same flags or start a new --out-dir")
        model.load_state_dict(ckpt["model"])
        extra.load_state_dict(ckpt["extra"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_miou, history, partial = ckpt["epoch"] + 1, ckpt["best_miou"], ckpt["history"], ckpt.get("partial")
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        if partial is not None and not is_main():  # the saved totals are already summed over ranks
            partial = dict(partial, totals={}, n_images=0, wait=0.0)
        log(f"resumed {args.resume} at epoch {start_epoch}" + (f" batch {partial['step']}" if partial else "")
            + f" (best mIoU {100 * best_miou:.2f})")
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    extra.to(device)
    if is_main():
        write_json(os.path.join(args.out_dir, "config.json"), vars(args))
    train_set, val_set = datasets["train"], datasets["val"]
    val_loader = make_loader(val_set, args.batch_size, args.workers)
    log(f"{arch}: {count_params(model):,} parameters | train {len(train_set)} val {len(val_set)} images | "
        f"device {device} x {world_size()} process(es) | precision {args.amp} | out {args.out_dir}")

    def checkpoint(epoch, **more):
        return {"model": model.state_dict(), "extra": extra.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_miou": best_miou, "history": history,
                "args": vars(args), "arch": arch, "num_classes": args.num_classes,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}, **more}

    last = os.path.join(args.out_dir, "last.pth")
    with StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.perf_counter()
            train_set.set_epoch(epoch)
            progress = partial if partial is not None and partial["epoch"] == epoch else dict(new_progress(), epoch=epoch)
            loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, skip_batches=progress["step"],
                                 generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
            steps, seconds_before = progress["step"] + len(loader), progress["seconds"]
            progress = train_one_epoch(model, compute_loss, loader, optimizer, device, args.amp, epoch, scaler,
                                       progress, stop, args.skip_nonfinite, args.accumulate, args.channels_last)
            if is_distributed():  # sum the epoch's loss totals and image counts over ranks
                keys = sorted(progress["totals"])
                summed = all_reduce_sum([progress["totals"][k] for k in keys] + [progress["n_images"]], device)
                progress = dict(progress, totals=dict(zip(keys, summed[:-1])), n_images=int(summed[-1]))
                broadcast_buffers(model)
            if progress["step"] < steps:  # interrupted inside the epoch: save exactly where we are
                if is_main():
                    save_checkpoint(checkpoint(epoch - 1, partial=progress), last)
                raise SystemExit(f"interrupted by {stop.signal}: saved {last} at epoch {epoch} batch {progress['step']}/"
                                 f"{steps}; continue with the same command plus --resume")
            metrics = evaluate(model, val_loader, device, args.num_classes, criterion, args.amp)
            scheduler.step(metrics["miou"])
            rec = {"epoch": epoch, **epoch_stats(progress), "val_loss": metrics["loss"], "val_miou": metrics["miou"],
                   "val_pixel_acc": metrics["pixel_acc"], "val_mean_class_acc": metrics["mean_class_acc"],
                   "lr": optimizer.param_groups[0]["lr"],
                   "epoch_s": seconds_before + time.perf_counter() - t0}
            history.append(rec)
            is_best = metrics["miou"] > best_miou
            best_miou = max(best_miou, metrics["miou"])
            if is_main():  # only rank 0 writes; the others hold the same weights
                save_checkpoint(checkpoint(epoch), last)
                if (epoch + 1) % args.save_every == 0:
                    atomic_copy(last, os.path.join(args.out_dir, f"epoch_{epoch + 1:03d}.pth"))
                if is_best:
                    atomic_copy(last, os.path.join(args.out_dir, "best.pth"))
                write_json(os.path.join(args.out_dir, "history.json"), history)
                with open(os.path.join(args.out_dir, "history.json")) as f:
                    plot_history(json.load(f), args.out_dir)
                print(format_epoch(rec), flush=True)
            if stop.signal:
                raise SystemExit(f"interrupted by {stop.signal}: saved {last} after epoch {epoch}; "
                                 f"continue with the same command plus --resume")
    log(f"done: best val mIoU {100 * best_miou:.2f} -> {os.path.join(args.out_dir, 'best.pth')}")
    if is_distributed():
        torch.distributed.barrier()  # nobody leaves before rank 0 has written the last files
    return history


# ---------------------------------------------------------------------------------------------
# Distillation: a frozen teacher and the teacher-logit cache
# ---------------------------------------------------------------------------------------------

def add_teacher_args(parser):
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="teacher checkpoint from 'train_baseline.py --model teacher' (default: torchvision's "
                             "COCO_WITH_VOC_LABELS_V1 FCN-ResNet50)")
    parser.add_argument("--teacher-dtype", choices=tuple(PRECISIONS), default=None,
                        help="precision the frozen teacher runs in (autocast for bf16/fp16); part of the teacher-logit "
                             "cache key (default: fp32 on CPU; on CUDA bf16 where supported, else fp16)")
    return parser


def resolve_teacher_dtype(teacher_dtype, device):
    """--teacher-dtype as given, or its default for device: fp32 on CPU, the device's 16-bit type on CUDA."""
    if teacher_dtype is not None:
        return teacher_dtype
    return low_precision(device) if device.type == "cuda" else "fp32"


def build_frozen_teacher(args, device):
    """The teacher in eval mode, no grad, frozen BatchNorm, channels_last, on device."""
    teacher = build_teacher(args.num_classes, pretrained=True, weights_path=args.teacher_weights)
    teacher.eval().requires_grad_(False)
    log(f"teacher: FCN-ResNet50, {count_params(teacher):,} parameters, "
        f"{args.teacher_weights or 'torchvision COCO_WITH_VOC_LABELS_V1'}, runs in {args.teacher_dtype}")
    return teacher.to(device, memory_format=torch.channels_last)


def state_fingerprint(module):
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherLogitCache:
    """Teacher logits for every training image, at the teacher's native output resolution (stride 8), fp16,
    in a memory-mapped .npy. The teacher sees each image resized to image_size (augmentation off), in `precision`; at train time
    the sample's augmentation grid resamples the cached logits, so they follow the same scale/crop/flip as the
    image and mask. Keyed by teacher weights, its precision, image size and dataset; rebuilt when any changes."""

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
                write_json(meta_path, {"key": key, "teacher_dtype": precision, "build_s": self.build_s})
        self.size_mb = os.path.getsize(self.path) / 2 ** 20
        self._logits = None

    @torch.no_grad()
    def _build(self, teacher, dataset, device, batch_size, workers):
        plain = SegmentationDataset(dataset.cache, dataset.image_size, train=True, seed=dataset.seed)
        plain.augment, plain.indices = False, dataset.indices
        loader = make_loader(plain, batch_size, workers)
        out = None
        tmp = self.path[:-4] + ".tmp.npy"
        for batch in tqdm(loader, desc="caching teacher logits", leave=False):
            with autocast(device, self.precision):
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
    return F.grid_sample(batch["extra"].float(), batch["grid"], mode="bilinear", padding_mode="border",
                         align_corners=False)  # border: edges replicate exactly as the live teacher's F.interpolate


# ---------------------------------------------------------------------------------------------
# Inference backends and timing (time_student.py, time_teacher.py)
# ---------------------------------------------------------------------------------------------

TIMING_BACKENDS = ("eager", "channels_last", "bf16", "fp16", "compile", "onnxruntime")


class BackendUnavailable(Exception):
    """This backend cannot run on this machine/device (the reason is reported, not hidden)."""


def backend_list(text):
    names = TIMING_BACKENDS if text == "all" else tuple(text.split(","))
    bad = [n for n in names if n not in TIMING_BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend {bad[0]!r}; choose from {', '.join(TIMING_BACKENDS)} or all")
    return names


def add_timing_args(parser):
    add_data_args(parser)
    parser.add_argument("--backend", type=backend_list, default="eager",
                        help=f"how the model runs: {', '.join(TIMING_BACKENDS)}, a comma-separated list of them, or "
                             f"'all' for every backend side by side (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="batch size of the throughput measurement (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=50,
                        help="timed runs at batch 1 per backend, in turns with the other backends (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's default)")
    parser.add_argument("--no-miou", action="store_true", help="skip the val mIoU measurement")
    parser.add_argument("--profile", action="store_true",
                        help="print where the time goes: a torch.profiler table of the eager model, ONNX Runtime's "
                             "kernel time and GFLOP/s per kind of operator (when --backend includes onnxruntime), and "
                             "this machine's fp32 compute floor for the model")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON to PATH")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw latency distributions (and, with "
                        "--compare, the speed/accuracy point of each model) to PATH")
    parser.add_argument("--compare", nargs="*", default=[], metavar="JSON",
                        help="timing JSON files of other models to draw beside this one in --plot")
    return parser


def export_onnx(model, path, image_size, verify=True):
    """Export to ONNX with a dynamic batch axis; verify ONNX Runtime's output against PyTorch's. Returns max |diff|."""
    model = copy.deepcopy(model).eval().cpu()  # the caller's model stays on its device and in its mode
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes about python flags
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if not verify:
        return None
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x3).numpy()
    diff = float(np.abs(session.run(None, {"image": x3.numpy()})[0] - ref).max())
    if not diff < 1e-3:
        raise SystemExit(f"error: ONNX export {path} differs from PyTorch by {diff:.2e} (max abs); not usable")
    return diff


def onnx_session(model, image_size, device, threads=None, profile_prefix=None):
    """An ONNX Runtime session (all graph optimisations) of model exported at image_size; BackendUnavailable without
    onnxruntime. profile_prefix: turn on ONNX Runtime's profiler, writing its JSON at that path prefix."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)")
    import tempfile
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    with tempfile.TemporaryDirectory() as tmp:  # the session keeps the model in memory; the file can go
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model.cpu(), path, image_size, verify=False)
        return ort.InferenceSession(path, options, providers=providers + ["CPUExecutionProvider"])


def prepare_backend(model, backend, device, image_size, threads=None):
    """A function x -> float32 logits running model with the given backend; BackendUnavailable if it can't run here."""
    model = copy.deepcopy(model).eval().to(device)
    if backend == "eager":
        return model
    if backend == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        return lambda x: model(x.contiguous(memory_format=torch.channels_last))
    if backend == "bf16":
        # runs on any CPU: natively with AVX512-BF16/AMX, emulated (same rounding, slower) elsewhere
        return lambda x: _autocast_run(model, x, device.type, torch.bfloat16)
    if backend == "fp16":
        if device.type != "cuda":
            raise BackendUnavailable("fp16 inference is a CUDA backend; on CPU use bf16")
        model = model.half()
        return lambda x: model(x.half()).float()
    if backend == "compile":
        compiled = torch.compile(model)
        return compiled
    if backend == "onnxruntime":
        session = onnx_session(model, image_size, device, threads)
        return lambda x: torch.from_numpy(session.run(None, {"image": x.cpu().numpy()})[0]).to(x.device)
    raise ValueError(backend)


def _autocast_run(model, x, device_type, dtype):
    with torch.autocast(device_type, dtype=dtype):
        return model(x).float()


def measure_latency(fns, x, warmup, runs, device, rounds=10):
    """Seconds per call of each fn(x) in fns (name -> fn; runs: name -> timed calls), each call timed alone after
    warm-up (CUDA synchronised). The functions take turns over `rounds` rounds, so a busy spell of a shared machine
    slows all of them alike and the ratios between them stay fair; each turn starts with one untimed call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    times = {name: [] for name in fns}
    rounds = max(1, min(rounds, max(runs.values())))  # a round in which nothing is timed would only cost time
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        sync()
        for r in range(rounds):
            for name, fn in fns.items():
                time.sleep(0.05)  # lets the previous runtime's spinning worker threads go to sleep
                fn(x)  # untimed: the first call of a turn pays for the caches the other functions evicted
                for _ in range(runs[name] * (r + 1) // rounds - runs[name] * r // rounds):  # runs spread evenly
                    t0 = time.perf_counter()
                    fn(x)
                    sync()
                    times[name].append(time.perf_counter() - t0)
    return times


def latency_stats(seconds):
    median = float(np.median(seconds))
    return {"latency_ms_median": 1000 * median, "latency_ms_p90": 1000 * float(np.percentile(seconds, 90)),
            "fps": 1.0 / median, "latencies_ms": [1000 * t for t in seconds]}


def prepare_backends(model, backends, device, x, threads):
    """name -> (fn, max |fn(x) - eager(x)|) for each backend that runs here; name -> reason for the others."""
    with torch.inference_mode():
        reference = model(x).float()
    ready, unavailable = {}, {}
    for backend in backends:
        try:
            fn = prepare_backend(model, backend, device, x.shape[-1], threads)
            with torch.inference_mode():
                ready[backend] = fn, float((fn(x).float() - reference).abs().max())
        except BackendUnavailable as e:
            unavailable[backend] = str(e)
    return ready, unavailable


class _Callable(nn.Module):
    """Lets evaluate() run any backend function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def load_model_for_timing(path, arch):
    """The network in a checkpoint, which must be of the given arch (student/teacher)."""
    model, found, _, _ = load_model(path)
    if found != arch:
        raise SystemExit(f"error: --weights {path} holds a {found}; use time_{found}.py for it")
    return model


def time_model(model, name, args, teacher=None):
    """The timing recipe shared by time_student.py and time_teacher.py: every requested backend's latency (batch 1,
    median/p90), throughput at --batch-size, output difference to eager, and val mIoU; with a teacher, its batch-1
    latency on the same backends, measured in turns with the model's. Prints a table, writes --json and --plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_run(args, strategy="timing")
    args.image_size = args.image_size or 256
    args.num_classes = model.num_classes
    backends = backend_list(args.backend) if isinstance(args.backend, str) else args.backend
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, args.image_size, args.image_size, generator=gen).to(device)
    xb = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    model = model.eval().to(device)
    result = {"model": name, "params": count_params(model), "image_size": args.image_size, "device": str(device),
              "size_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "miou": None,
              "gflops": model_gflops(model, x1), "backends": {}}
    ready, unavailable = prepare_backends(model, backends, device, x1, args.threads)
    for backend, reason in unavailable.items():
        print(f"{backend:>14s}: unavailable ({reason})")
    if not ready:
        raise SystemExit(f"error: --backend {','.join(backends)}: none of them can run here (see above); "
                         f"eager and onnxruntime run everywhere")
    fns = {backend: fn for backend, (fn, _) in ready.items()}
    runs = {backend: args.runs for backend in fns}
    if teacher is not None:
        teacher_ready, _ = prepare_backends(teacher.eval().to(device), list(fns), device, x1, args.threads)
        fns.update({f"teacher {b}": fn for b, (fn, _) in teacher_ready.items()})
        runs.update({f"teacher {b}": args.teacher_runs for b in teacher_ready})
    latencies = measure_latency(fns, x1, args.warmup, runs, device)
    batched = measure_latency({b: fns[b] for b in ready}, xb, min(args.warmup, 2),
                              {b: max(3, args.runs // 10) for b in ready}, device)
    val_loader = None
    if not args.no_miou:
        args.eval_only = True
        val_loader = make_loader(build_datasets(args, splits=("val",))[0]["val"], 8, args.workers)
    for backend in backends:
        if backend in unavailable:
            result["backends"][backend] = {"unavailable": unavailable[backend]}
            continue
        rec = latency_stats(latencies[backend])
        rec.update(throughput_img_s=args.batch_size / float(np.median(batched[backend])), max_abs_diff=ready[backend][1])
        if val_loader is not None:
            rec["miou"] = evaluate(_Callable(fns[backend]), val_loader, device, model.num_classes)["miou"]
            if backend == "eager" or result["miou"] is None:
                result["miou"] = rec["miou"]
        result["backends"][backend] = rec
        print(f"{backend:>14s}: {rec['latency_ms_median']:8.2f} ms median, {rec['latency_ms_p90']:8.2f} ms p90 at batch 1 | "
              f"{rec['throughput_img_s']:7.1f} img/s at batch {args.batch_size} | max |diff| {rec['max_abs_diff']:.1e}"
              + (f" | mIoU {100 * rec['miou']:.2f}" if "miou" in rec else ""))
    if teacher is not None:
        result["vs_teacher"] = {"params": count_params(teacher), "weights": args.teacher_weights, "backends": {}}
        for backend, (_, diff) in teacher_ready.items():
            rec = latency_stats(latencies[f"teacher {backend}"])
            rec.update(max_abs_diff=diff, ratio=rec["latency_ms_median"] / result["backends"][backend]["latency_ms_median"])
            result["vs_teacher"]["backends"][backend] = rec
    print_timing_table(result)
    if args.profile:
        profile_model(model, x1)
        result["gemm_gflops_per_s"] = gemm_gflops_per_s(device)
        if "onnxruntime" in ready:
            result["onnxruntime_profile"] = [{"kind": k, "ms": ms, "gflop": g}
                                             for k, ms, g in profile_onnxruntime(model, x1, args.threads)]
        print_profile(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        others = []
        for path in args.compare:
            with open(path) as f:
                others.append(json.load(f))
        plot_timing([result] + others, args.plot)
    return result


def print_timing_table(result):
    ok = {k: v for k, v in result["backends"].items() if "latency_ms_median" in v}
    eager = ok.get("eager", {}).get("latency_ms_median")
    teacher = result.get("vs_teacher", {}).get("backends", {})
    print(f"\n{result['model']}: {result['params']:,} parameters, {result['size_mb']:.1f} MB, {result['image_size']}px, "
          f"{result['device']}, {result['threads']} threads" + (f", val mIoU {100 * result['miou']:.2f}" if result["miou"] is not None else ""))
    print("| backend | median ms (batch 1) | p90 ms | FPS | img/s (batch %d) | speed-up vs eager | max abs diff |" % result["batch_size"]
          + (" teacher ms (batch 1) | teacher / student |" if teacher else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if teacher else ""))
    for name, r in ok.items():
        speedup = f"{eager / r['latency_ms_median']:.2f}x" if eager else "-"
        t = teacher.get(name)
        print(f"| {name} | {r['latency_ms_median']:.2f} | {r['latency_ms_p90']:.2f} | {r['fps']:.1f} | "
              f"{r['throughput_img_s']:.1f} | {speedup} | {r['max_abs_diff']:.1e} |"
              + (f" {t['latency_ms_median']:.1f} | {t['ratio']:.1f}x |" if t else " - | - |" if teacher else ""))


def profile_model(model, x, rows=15):
    """Where the eager model's time goes: torch.profiler operator table, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=activities) as prof:
            for _ in range(10):
                model(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def model_gflops(model, x):
    """Floating-point operations of model(x) (convolutions and matrix products; 1 multiply-add = 2), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def gemm_gflops_per_s(device, n=2048, runs=10):
    """This machine's fp32 matrix-multiply rate right now (median of torch.mm of two n x n matrices): the practical
    compute roofline that no fp32 backend beats on convolutions."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = measure_latency({"mm": lambda x: torch.mm(a, x)}, b, 2, {"mm": runs}, device, rounds=1)["mm"]
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def onnx_kernel_kind(args):
    """(kind, FLOP) of one ONNX Runtime kernel from the shapes in its profiler record."""
    shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
    out = list(args["output_type_shape"][0].values())[0] if args.get("output_type_shape") else []
    op = args["op_name"]
    if op == "Conv":
        w = shapes[1]  # (out channels, in channels / groups, kh, kw)
        flops = 2 * math.prod(out) * math.prod(w[1:])
        if out[2:] == [1, 1]:
            return "conv on 1x1 maps (squeeze-excitation)", flops
        if w[2:] == [1, 1]:
            return "conv 1x1", flops
        return (f"conv depthwise {w[2]}x{w[3]}" if w[1] == 1 else f"conv {w[2]}x{w[3]}"), flops
    if op in ("MatMul", "FusedMatMul"):
        return "matmul (final upsampling)", 2 * math.prod(out) * shapes[0][-1]
    if op in ("ReorderInput", "ReorderOutput"):
        return "layout reorder NCHW <-> NCHWc", 0
    return op, 0


def profile_onnxruntime(model, x, threads=None, runs=20, warmup=3):
    """Where ONNX Runtime's time goes: its session profiler over `runs` runs after `warmup`, kernel time and GFLOP per
    run for each kind of operator (convolutions split by shape). Returns [(kind, ms, GFLOP)], slowest first."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(model, x.shape[-1], x.device, threads, profile_prefix=os.path.join(tmp, "ort"))
        feed = {"image": x.cpu().numpy()}
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    start = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup]
    kinds = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            kind, flops = onnx_kernel_kind(e["args"])
            ms, gflop = kinds.get(kind, (0.0, 0.0))
            kinds[kind] = ms + e["dur"] / 1000 / runs, gflop + flops / 1e9 / runs
    return sorted(((k, ms, gflop) for k, (ms, gflop) in kinds.items()), key=lambda r: -r[1])


def print_profile(result):
    """The ONNX Runtime kernel table (if profiled) and the model's distance from the fp32 compute floor."""
    rows = result.get("onnxruntime_profile", [])
    if rows:
        total = sum(r["ms"] for r in rows)
        print(f"\nONNX Runtime kernels of the {result['model']} (session profiler, batch 1): {total:.2f} ms per run")
        print("| operator | ms per run | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['ms']:.2f} | {100 * r['ms'] / total:.1f}% | {r['gflop']:.3f} | "
                  + (f"{r['gflop'] / r['ms'] * 1000:.0f} |" if r["gflop"] else "- |"))
    timed = [b["latency_ms_median"] for b in result["backends"].values() if "latency_ms_median" in b]
    floor = result["gflops"] / result["gemm_gflops_per_s"] * 1000
    print(f"{result['gflops']:.2f} GFLOP per image; fp32 matrix multiply runs at {result['gemm_gflops_per_s']:.0f} GFLOP/s "
          f"here now (torch.mm 2048x2048, {result['threads']} threads), so {floor:.1f} ms is the fp32 compute floor at "
          f"batch 1" + (f"; the fastest backend's {min(timed):.1f} ms is {min(timed) / floor:.2f}x that floor" if timed else ""))


def plot_timing(results, path):
    """Latency distribution per backend (per model) and, for several models, latency vs val mIoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, data = [], []
    for r in results:
        for backend, b in r["backends"].items():
            if "latencies_ms" in b:
                labels.append(f"{r['model']}\n{backend}")
                data.append(b["latencies_ms"])
        for backend, b in r.get("vs_teacher", {}).get("backends", {}).items():
            labels.append(f"teacher (in turns with the {r['model']})\n{backend}")
            data.append(b["latencies_ms"])
    axes[0].boxplot(data, orientation="horizontal")
    axes[0].set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set(xlabel="latency per image at batch 1 (ms, log)", title="Timing statistics")
    axes[0].grid(alpha=0.3)
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    points = [(f"{r['model']} {backend}", b["latency_ms_median"], 100 * b["miou"]) for r in results
              for backend, b in r["backends"].items() if "latency_ms_median" in b and b.get("miou") is not None]
    for label, latency, miou in points:
        axes[1].scatter(latency, miou)
        axes[1].annotate(label, (latency, miou), fontsize=7)
    if not points:
        axes[1].text(0.5, 0.5, "no val mIoU measured (--no-miou)", ha="center", transform=axes[1].transAxes)
    axes[1].set_xscale("log")
    axes[1].set(xlabel="median latency (ms, log)", ylabel="val mIoU (%)", title="Speed vs accuracy")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
