"""SBD (the Semantic Boundaries Dataset) for --train-set trainaug: download, .mat masks converted once to PNG, and the
trainaug id list (VOC train + SBD train + SBD val - VOC val), the set published VOC results train on.
"""
import os
import socket
import urllib.error

import numpy as np

import errors
import fileio
import voc

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
        raise errors.UserError(f"--train-set trainaug needs SBD at {root}; drop --no-download to fetch it")
    from torchvision.datasets.utils import download_and_extract_archive
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(voc.DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(SBD_URL, data_dir, filename="benchmark.tgz", md5=SBD_MD5)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise errors.UserError(f"could not download SBD ({e}); download benchmark.tgz (md5 {SBD_MD5}) from {SBD_URL} "
                               f"and extract it in {os.path.abspath(data_dir)}/ (giving benchmark_RELEASE/dataset/)")
    finally:
        socket.setdefaulttimeout(old_timeout)
    return root


def trainaug_pairs(voc_root, data_dir, download=True):
    """(id, image, mask) of VOC train + SBD train + SBD val - VOC val. VOC's own masks win where both exist; SBD's
    .mat masks are converted once to palette PNGs under DATA_DIR/SBD_png."""
    root = sbd_root(data_dir, download)
    voc_val = set(voc.read_split_ids(voc_root, "val"))
    sbd_ids = set()
    for split in ("train", "val"):
        with open(os.path.join(root, split + ".txt")) as f:
            sbd_ids.update(line.strip() for line in f if line.strip())
    ids = sorted((set(voc.read_split_ids(voc_root, "train")) | sbd_ids) - voc_val)
    png_dir = os.path.join(data_dir, "SBD_png")
    os.makedirs(png_dir, exist_ok=True)
    pairs = []
    for image_id in ids:
        img_path, mask_path = voc.pair_paths(voc_root, image_id)
        if not os.path.isfile(img_path):
            img_path = os.path.join(root, "img", image_id + ".jpg")
        if not os.path.isfile(mask_path):
            mask_path = os.path.join(png_dir, image_id + ".png")
            if not os.path.isfile(mask_path):
                mat = os.path.join(root, "cls", image_id + ".mat")
                fileio.atomic_write(mask_path, lambda tmp, mat=mat: voc.save_mask_png(read_sbd_mask(mat), tmp))
        pairs.append((image_id, img_path, mask_path))
    return pairs


def read_sbd_mask(path):
    """Class-index mask of an SBD cls/*.mat file (GTcls.Segmentation), as torchvision's SBDataset reads it."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise errors.UserError("reading SBD's .mat masks needs scipy: pip install scipy")
    try:
        return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise errors.UserError(f"cannot read SBD mask {path} ({e}); re-extract benchmark.tgz")
