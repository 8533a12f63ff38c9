"""The offline synthetic dataset, in VOC folder format: 21 classes as hue x shape x texture on cluttered backgrounds.

    python -c "import toy_voc; print(toy_voc.make_toy_voc('data/toy'))"    # what --toy does on first use

Generated once, deterministically from a seed; every script reads it like real VOC (--toy).
"""
import os
import shutil

import numpy as np
from PIL import Image

import errors
import fileio
from voc import IGNORE_INDEX, save_mask_png

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
    """Generate (once, deterministically) the synthetic dataset in VOC folder format; returns its root. Several runs
    started together on a fresh --data-dir: one generates it, the others wait for it and use it."""
    root = os.path.join(toy_dir, "VOCdevkit", "VOC2012")
    stamp = os.path.join(toy_dir, "COMPLETE")
    wanted = f"toy v{TOY_VERSION} seed {seed}"
    if _stamp(stamp) == wanted:
        return root
    try:
        os.makedirs(os.path.dirname(os.path.abspath(toy_dir)), exist_ok=True)
        with fileio.build_lock(toy_dir + ".lock"):
            if _stamp(stamp) != wanted:  # (another process may have generated it while we waited)
                _generate(toy_dir, seed, wanted)
    except OSError as e:
        raise errors.UserError(f"cannot generate the toy set in {toy_dir} ({e.strerror}); point --data-dir at a "
                               f"writable folder") from None
    return root


def _stamp(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _generate(toy_dir, seed, stamp):
    """Write the whole set into a folder of this process's own, then swap it in for toy_dir."""
    tmp = f"{toy_dir}.tmp{os.getpid()}"
    with fileio.on_signal_exit(f"generating the toy set in {toy_dir}", cleanup=[tmp]):
        tmp_root = os.path.join(tmp, "VOCdevkit", "VOC2012")
        for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
            os.makedirs(os.path.join(tmp_root, sub), exist_ok=True)
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
            f.write(stamp + "\n")
        if os.path.exists(toy_dir):
            shutil.rmtree(toy_dir)
        os.replace(tmp, toy_dir)
