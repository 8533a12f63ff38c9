"""--train-set trainaug on a generated SBD-format sample: no VOC val image leaks in, SBD .mat masks convert exactly."""
import os

import numpy as np
import pytest
from PIL import Image

import common
import errors
import sbd
import train_baseline
import voc

scipy_io = pytest.importorskip("scipy.io")


def _make_sbd(data_dir, toy_root, rng):
    root = os.path.join(data_dir, "benchmark_RELEASE", "dataset")
    os.makedirs(os.path.join(root, "cls"))
    os.makedirs(os.path.join(root, "img"))
    voc_val = voc.read_split_ids(toy_root, "val")[:3]      # SBD overlaps VOC val: must not leak into trainaug
    voc_train = voc.read_split_ids(toy_root, "train")[:2]  # also in VOC train: VOC's own mask wins
    new = [f"sbd_{i:04d}" for i in range(3)]
    masks = {}
    for image_id in voc_val + voc_train + new:
        h, w = int(rng.integers(40, 60)), int(rng.integers(40, 60))
        mask = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        masks[image_id] = mask
        scipy_io.savemat(os.path.join(root, "cls", image_id + ".mat"),
                         {"GTcls": {"Segmentation": mask, "CategoriesPresent": np.unique(mask)}})
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "img", image_id + ".jpg"))
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(voc_val[:2] + new[:2]) + "\n")
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("\n".join(voc_val[2:] + voc_train + new[2:]) + "\n")
    return root, voc_val, voc_train, new, masks


def test_trainaug_has_no_val_ids_and_converts_masks(toy_root, tmp_path):
    data_dir = str(tmp_path)
    root, voc_val, voc_train, new, masks = _make_sbd(data_dir, toy_root, np.random.default_rng(0))
    pairs = sbd.trainaug_pairs(toy_root, data_dir, download=False)
    ids = [p[0] for p in pairs]
    assert not set(ids) & set(voc.read_split_ids(toy_root, "val"))
    assert set(ids) == set(voc.read_split_ids(toy_root, "train")) | set(new)
    by_id = {image_id: (img, mask) for image_id, img, mask in pairs}
    for image_id in new:  # SBD-only: its image, its converted mask
        assert by_id[image_id][0] == os.path.join(root, "img", image_id + ".jpg")
        np.testing.assert_array_equal(np.asarray(Image.open(by_id[image_id][1])), masks[image_id])
    for image_id in voc_train:  # VOC's own annotation is used
        assert by_id[image_id][1] == os.path.join(toy_root, "SegmentationClass", image_id + ".png")
    cache = voc.PixelCache(toy_root, "trainaug", str(tmp_path / "cache"), pairs=pairs)
    np.testing.assert_array_equal(cache.get(ids.index(new[1]))[1], masks[new[1]])


def test_train_set_flag_builds_the_trainaug_split(data_dir, toy_root, tmp_path):
    _, _, _, new, _ = _make_sbd(str(tmp_path), toy_root, np.random.default_rng(1))
    args = train_baseline.get_args_parser().parse_args(
        ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--train-set", "trainaug",
         "--no-download", "--out-dir", str(tmp_path / "run")])
    args.toy = False
    os.makedirs(tmp_path / "VOCdevkit")
    os.symlink(toy_root, tmp_path / "VOCdevkit" / "VOC2012")
    datasets = common.build_datasets(common.data_config(args), splits=("train",))
    assert len(datasets["train"]) == len(voc.read_split_ids(toy_root, "train")) + len(new)


def test_missing_sbd_without_download_is_a_clear_error(toy_root, tmp_path):
    with pytest.raises(errors.UserError, match="--train-set trainaug needs SBD at .*benchmark_RELEASE"):
        sbd.trainaug_pairs(toy_root, str(tmp_path), download=False)
