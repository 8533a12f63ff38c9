"""PASCAL VOC's format and files: the class list and palette, finding and downloading VOC 2012, split lists, reading
images and palette masks (every bad file named), and the pixel cache that decodes a split once.

Imported by common (the dataset), toy_voc and sbd (which write and read the same format); importing it does no work.
"""
import hashlib
import os
import socket
import sys
import urllib.error

import numpy as np
from PIL import Image
from tqdm import tqdm

import errors
import fileio

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

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
    failures = []
    if not check_integrity(tar_path, VOC_MD5):
        if os.path.exists(tar_path):
            failures.append(f"{tar_path}: md5 mismatch (incomplete download?)")
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            for url in urls:
                try:
                    download_url(url, data_dir, filename=VOC_TAR, md5=VOC_MD5, max_redirect_hops=5)
                    if check_integrity(tar_path, VOC_MD5):
                        break
                    failures.append(f"{url}: md5 mismatch")
                except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
                    failures.append(f"{url}: {e}")
        finally:
            socket.setdefaulttimeout(old_timeout)
    if not check_integrity(tar_path, VOC_MD5):
        raise errors.UserError(
            f"could not download PASCAL VOC 2012 ({'; '.join(failures)}). Download {VOC_TAR} "
            f"(md5 {VOC_MD5}) by hand and put it in {os.path.abspath(data_dir)}/, or put the extracted "
            f"VOCdevkit/ folder there; or run with --toy for the offline synthetic dataset.")
    print(f"extracting {tar_path} ...", file=sys.stderr)
    extract_archive(tar_path, data_dir)



# ---------------------------------------------------------------------------------------------
# Reading VOC files and the pixel cache
# ---------------------------------------------------------------------------------------------

def read_split_ids(root, split):
    """Image ids listed in ImageSets/Segmentation/<split>.txt."""
    path = os.path.join(root, "ImageSets", "Segmentation", split + ".txt")
    if not os.path.isfile(path):
        raise errors.UserError(f"{path} not found: the dataset has no '{split}' split list; "
                               f"check --data-dir / --split")
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise errors.UserError(f"{path} lists no images")
    return ids


class DataProblem(errors.UserError):
    """A bad image or mask file; the message names the file and what is wrong with it."""


MAX_PROBLEMS_SHOWN = 20


def stop_on_problems(problems, what):
    """One error listing every bad file (up to a cap), so one fix-and-rerun cycle is enough."""
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise errors.UserError(f"{len(problems)} problem(s) in {what}; fix, replace or remove these files from the "
                               f"split list (ImageSets/Segmentation), then run again:\n  {shown}{more}")


def read_image(path):
    """RGB uint8 array (H, W, 3); a missing or corrupt file raises DataProblem."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataProblem(f"cannot read image {path} ({e})")


def read_mask(path, num_classes=len(VOC_CLASSES)):
    """Class-index mask (H, W) uint8 from a palette PNG: 0..num_classes-1, 255 = ignore; else DataProblem."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataProblem(f"mask {path} has mode {img.mode}; expected a palette (P) or grey (L) PNG of "
                                  f"class indices")
            mask = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataProblem(f"cannot read mask {path} ({e})")
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise DataProblem(f"mask {path} has values {bad[:10].tolist()} outside 0..{num_classes - 1} and "
                          f"{IGNORE_INDEX} (ignore); fix the mask or pass the right --num-classes")
    return mask


def pair_paths(root, image_id):
    return (os.path.join(root, "JPEGImages", image_id + ".jpg"),
            os.path.join(root, "SegmentationClass", image_id + ".png"))


def split_pairs(root, split):
    """(id, image path, mask path) of every image listed in ImageSets/Segmentation/<split>.txt."""
    return [(image_id, *pair_paths(root, image_id)) for image_id in read_split_ids(root, split)]


def fingerprint(pairs):
    """Hash of the split's file names, sizes and mtimes: any change to the source rebuilds caches."""
    h, missing = hashlib.sha1(), []
    for image_id, *paths in pairs:
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                missing.append(f"{path} is listed in the split but missing (id '{image_id}')")
                continue
            h.update(f"{image_id}:{st.st_size}:{st.st_mtime_ns};".encode())
    stop_on_problems(missing, "the split list")
    return h.hexdigest()


CACHE_VERSION = 2  # index.json layout; older caches are rebuilt


class PixelCache:
    """Decoded images and masks of one split at original resolution, as two flat uint8 memmaps plus an index that
    records each file's size and checksum. Built once (by one process while any others wait), checked every time it is
    opened, rebuilt when the source fingerprint changes or the check fails."""

    FILES = ("images.npy", "masks.npy")

    def __init__(self, root, split, cache_dir, num_classes=len(VOC_CLASSES), pairs=None):
        self.pairs = pairs if pairs is not None else split_pairs(root, split)
        self.ids = [image_id for image_id, _, _ in self.pairs]
        self.fingerprint = fingerprint(self.pairs)
        tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
        self.dir = os.path.join(cache_dir, f"pixels-{tag}-{split}")
        self.lock_path = os.path.join(self.dir, "build.lock")  # shared by every cache kept in this folder
        index, damage = self._check(num_classes)
        if index is None:
            if damage:
                fileio.warn(f"the pixel cache {self.dir} is damaged ({damage}); rebuilding it")
            fileio.make_cache_dir(self.dir, damage and f"the pixel cache {self.dir} is damaged ({damage})")
            with fileio.build_lock(self.lock_path):
                index, _ = self._check(num_classes)  # another process may have built it while we waited
                if index is None:
                    index = self._build(root, num_classes)
        self.shapes = [tuple(s) for s in index["shapes"]]
        self.img_offsets = np.array(index["img_offsets"], dtype=np.int64)
        self.mask_offsets = np.array(index["mask_offsets"], dtype=np.int64)
        self.num_classes = num_classes
        self._images = self._masks = None  # opened lazily, once per (worker) process

    def _check(self, num_classes):
        """(index, None) if the cache is complete, current and intact; (None, what is damaged) if it fails its check;
        (None, None) if there is none yet or its source changed."""
        index_path = os.path.join(self.dir, "index.json")
        if not os.path.exists(index_path):
            return None, None
        try:
            index = fileio.read_json(index_path)
        except ValueError as e:
            return None, str(e)
        if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
            return None, f"{index_path} is not an index this code wrote"
        if (index.get("version"), index.get("fingerprint"), index.get("num_classes")) != (
                CACHE_VERSION, self.fingerprint, num_classes):
            return None, None
        for name in self.FILES:
            damage = fileio.check_file(os.path.join(self.dir, name), index["files"].get(name))
            if damage:
                return None, damage
        return index, None

    def _build(self, root, num_classes):
        shapes, problems = [], []
        for _, img_path, _ in self.pairs:  # first pass: sizes only (headers), to size the memmaps
            try:
                with Image.open(img_path) as im:
                    shapes.append((im.height, im.width))
            except (OSError, SyntaxError) as e:
                problems.append(f"cannot read image {img_path} ({e})")
                shapes.append((0, 0))  # reported with the others after the second pass
        mask_offsets = np.concatenate([[0], np.cumsum([h * w for h, w in shapes], dtype=np.int64)])
        img_offsets = mask_offsets * 3
        # per-process temporary names: a process that builds without the lock (a file system without flock) never
        # truncates a file another one is writing or has mapped
        tmp = [os.path.join(self.dir, f"{name[:-4]}.tmp{os.getpid()}.npy") for name in self.FILES]
        with fileio.on_signal_exit(f"building the pixel cache {self.dir}", cleanup=tmp):
            images = np.lib.format.open_memmap(tmp[0], "w+", np.uint8, (int(img_offsets[-1]),))
            masks = np.lib.format.open_memmap(tmp[1], "w+", np.uint8, (int(mask_offsets[-1]),))
            for i, (_, img_path, mask_path) in enumerate(tqdm(self.pairs, leave=False, disable=None,
                                                              desc=f"caching {os.path.basename(self.dir)}")):
                if shapes[i] == (0, 0):
                    continue
                try:
                    img, mask = read_image(img_path), read_mask(mask_path, num_classes)
                except DataProblem as e:
                    problems.append(str(e))
                    continue
                if img.shape[:2] != mask.shape or img.shape[:2] != shapes[i]:
                    problems.append(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                                    f"{img.shape[1]}x{img.shape[0]}; masks must match their images")
                    continue
                images[img_offsets[i]:img_offsets[i + 1]] = img.reshape(-1)
                masks[mask_offsets[i]:mask_offsets[i + 1]] = mask.reshape(-1)
            stop_on_problems(problems, f"{len(self.pairs)} image/mask pairs of {root}")
            images.flush()
            masks.flush()
            del images, masks
            files = {name: fileio.file_record(path) for name, path in zip(self.FILES, tmp)}
            for name, path in zip(self.FILES, tmp):
                os.replace(path, os.path.join(self.dir, name))
        index = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "num_classes": num_classes,
                 "files": files, "ids": self.ids, "shapes": shapes, "img_offsets": img_offsets.tolist(),
                 "mask_offsets": mask_offsets.tolist()}
        fileio.write_json(os.path.join(self.dir, "index.json"), index)  # written last: marks the cache complete
        return index

    def __len__(self):
        return len(self.ids)

    def get(self, i):
        """(image (H, W, 3) uint8, mask (H, W) uint8) of item i, views into the memmaps."""
        if self._images is None:
            try:
                self._images = np.load(os.path.join(self.dir, "images.npy"), mmap_mode="r")
                self._masks = np.load(os.path.join(self.dir, "masks.npy"), mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataProblem(f"the pixel cache {self.dir} was damaged or removed during the run ({e}); run again: "
                                  f"the cache is checked at the start and rebuilt") from None
        h, w = self.shapes[i]
        img = self._images[self.img_offsets[i]:self.img_offsets[i + 1]].reshape(h, w, 3)
        mask = self._masks[self.mask_offsets[i]:self.mask_offsets[i + 1]].reshape(h, w)
        return img, mask

    def masks(self):
        """Iterate over all masks (for class statistics)."""
        for i in range(len(self)):
            yield self.get(i)[1]
