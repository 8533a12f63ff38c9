"""Data: the loader against torchvision's VOCSegmentation, mask validation, augmentation geometry,
class weights and the confusion matrix against independent computations."""
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import VOCSegmentation

import common
import errors
import toy_voc
import voc
from conftest import VOC_SAMPLE


def test_toy_set_layout_and_determinism(data_dir, toy_root, tmp_path):
    for split, n in toy_voc.TOY_SIZES.items():
        assert len(voc.read_split_ids(toy_root, split)) == n
    again = toy_voc.make_toy_voc(str(tmp_path / "toy"))
    for image_id in ("toy_train_0000", "toy_val_0042"):
        a = np.asarray(Image.open(os.path.join(toy_root, "SegmentationClass", image_id + ".png")))
        b = np.asarray(Image.open(os.path.join(again, "SegmentationClass", image_id + ".png")))
        np.testing.assert_array_equal(a, b)
    cache = voc.PixelCache(toy_root, "train", str(tmp_path / "cache"))
    counts = common.class_pixel_counts(cache.masks(), 21)
    assert (counts > 0).all(), "every class must occur in the toy training set"
    all_values = np.unique(np.concatenate([np.unique(m) for m in cache.masks()]))
    assert 255 in all_values and 96 <= min(min(s) for s in cache.shapes) and max(max(s) for s in cache.shapes) <= 128


def _compare_with_torchvision(voc_parent, root, split, cache_dir):
    cache = voc.PixelCache(root, split, cache_dir)
    ref = VOCSegmentation(voc_parent, year="2012", image_set=split, download=False)
    assert len(ref) == len(cache)
    for i in range(len(cache)):
        img, target = ref[i]
        ours_img, ours_mask = cache.get(i)
        np.testing.assert_array_equal(ours_mask, np.asarray(target))
        np.testing.assert_array_equal(ours_img, np.asarray(img.convert("RGB")))
    return cache


def test_loader_matches_torchvision_on_toy(data_dir, toy_root, tmp_path):
    _compare_with_torchvision(os.path.join(data_dir, "toy"), toy_root, "val", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(VOC_SAMPLE), reason="../shared/voc_sample not present")
@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_reads_every_real_voc_pair(split, tmp_path):
    root = voc.find_voc_root(VOC_SAMPLE)
    cache = _compare_with_torchvision(VOC_SAMPLE, root, split, str(tmp_path))
    assert len(cache) == len(voc.read_split_ids(root, split))


def _copy_toy(toy_root, tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(toy_root, root)
    return str(root)


def test_mask_with_out_of_range_values_names_the_file(toy_root, tmp_path):
    root = _copy_toy(toy_root, tmp_path)
    bad = os.path.join(root, "SegmentationClass", "toy_val_0003.png")
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, 0] = 30
    voc.save_mask_png(mask, bad)
    with pytest.raises(errors.UserError, match=r"toy_val_0003\.png.*\[30\]"):
        voc.PixelCache(root, "val", str(tmp_path / "cache"))


def test_mask_of_wrong_size_and_missing_file(toy_root, tmp_path):
    root = _copy_toy(toy_root, tmp_path)
    bad = os.path.join(root, "SegmentationClass", "toy_val_0001.png")
    voc.save_mask_png(np.zeros((10, 10), np.uint8), bad)
    with pytest.raises(errors.UserError, match=r"toy_val_0001\.png is 10x10"):
        voc.PixelCache(root, "val", str(tmp_path / "cache"))
    os.remove(os.path.join(root, "JPEGImages", "toy_val_0002.jpg"))
    with pytest.raises(errors.UserError, match=r"toy_val_0002\.jpg is listed in the split but missing"):
        voc.PixelCache(root, "val", str(tmp_path / "cache"))


def test_cache_is_rebuilt_when_a_source_file_changes(toy_root, tmp_path):
    root = _copy_toy(toy_root, tmp_path)
    cache = voc.PixelCache(root, "val", str(tmp_path / "cache"))
    path = os.path.join(root, "SegmentationClass", "toy_val_0005.png")
    mask = np.asarray(Image.open(path)).copy()
    mask[:5, :5] = 7
    voc.save_mask_png(mask, path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    fresh = voc.PixelCache(root, "val", str(tmp_path / "cache"))
    assert fresh.fingerprint != cache.fingerprint
    np.testing.assert_array_equal(fresh.get(5)[1], mask)


def test_download_failure_is_one_clear_message(tmp_path):
    with pytest.raises(errors.UserError) as e:
        voc.download_voc(str(tmp_path), urls=("http://127.0.0.1:9/VOCtrainval_11-May-2012.tar",))
    msg = str(e.value)
    assert "VOCtrainval_11-May-2012.tar" in msg and str(tmp_path) in msg and "--toy" in msg


@pytest.mark.parametrize("size", [24, 80])  # down- and up-sampling (edges must replicate, not fade to black)
def test_validation_resize_equals_bilinear_interpolate(size):
    img = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    grid = common.sample_grid(37, 53, size)
    ours = common.warp_image(img, grid)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                        mode="bilinear", align_corners=False)[0]
    ref = (ref - torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(common.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # float32 rounding of grid coords


def test_training_crop_keeps_labels_and_pads_with_ignore():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 5
    rng = np.random.default_rng(0)
    seen_pad = False
    for _ in range(30):
        grid = common.sample_grid(40, 60, 96, rng)
        m = common.warp_mask(mask, grid)
        assert set(torch.unique(m).tolist()) <= {0, 5, 255}
        seen_pad |= bool((m == 255).any())
    assert seen_pad, "crops larger than the scaled image must be padded with the ignore label"
    flipped = common.warp_mask(np.fliplr(mask), common.sample_grid(40, 60, 40))
    unflipped = common.warp_mask(mask, common.sample_grid(40, 60, 40))
    np.testing.assert_array_equal(flipped.numpy(), np.fliplr(unflipped.numpy()))


def test_class_weights_against_hand_computation():
    masks = [np.array([[0, 0, 1], [255, 2, 0]], np.uint8), np.array([[1, 1, 0, 255]], np.uint8)]
    counts = common.class_pixel_counts(masks, 4)
    assert counts.tolist() == [4, 3, 1, 0]
    weights = common.class_weights_from_counts(counts)
    expected = [1 / np.log(1.02 + 4 / 8), 1 / np.log(1.02 + 3 / 8), 1 / np.log(1.02 + 1 / 8), 1 / np.log(1.02)]
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_confusion_matrix_against_numpy():
    rng = np.random.default_rng(1)
    c = 6
    target = rng.integers(0, c, size=(3, 50, 40))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 4] = 1  # class 4 never in ground truth ...
    pred = rng.integers(0, c, size=target.shape)
    pred[pred == 5] = 0  # ... class 5 never predicted; 4 still predicted (IoU 0), 5 present in gt (IoU 0)
    target[target == 5] = 3  # now 5 absent from both: must be excluded from the mean
    cm = common.ConfusionMatrix(c)
    for t, p in zip(target, pred):
        cm.update(torch.from_numpy(t), torch.from_numpy(p))
    out = cm.compute()
    valid = target != 255
    ious, accs = [], []
    for k in range(c):
        inter = np.sum((target == k) & (pred == k) & valid)
        union = np.sum(((target == k) | (pred == k)) & valid)
        ious.append(100 * inter / union if union else np.nan)  # percent, as everywhere in the repo
        gt = np.sum((target == k) & valid)
        accs.append(100 * inter / gt if gt else np.nan)
    assert np.isnan(out["iou_per_class"][5]) and out["iou_per_class"][4] == 0.0
    np.testing.assert_allclose(out["iou_per_class"], ious, rtol=1e-12)
    assert out["miou"] == pytest.approx(np.nanmean(ious), rel=1e-12)
    assert out["pixel_acc"] == pytest.approx(100 * np.sum((target == pred) & valid) / valid.sum(), rel=1e-12)
    assert out["mean_class_acc"] == pytest.approx(np.nanmean(accs), rel=1e-12)
    assert out["classes_predicted"] == len(np.unique(pred[valid])) == 5  # (5 never predicted)
    one = common.ConfusionMatrix(c)
    one.update(torch.from_numpy(target), torch.zeros(target.shape, dtype=torch.int64))
    assert one.compute()["classes_predicted"] == 1  # a model that has not learnt: background everywhere
