"""The training split held in device memory (--data-on-device): decoded pixels and masks (uint8) and, for the
cached-logit methods, the teacher's stride-8 logits (fp16) are uploaded once; each batch is augmented there as one
batched F.grid_sample from the same per-(seed, epoch, image) crop boxes as the loader's workers use
(common.SegmentationDataset.box), so a GPU never waits for a CPU to decode and warp its next batch.

Images of different sizes share one (N, H_max, W_max) buffer, each at its top-left corner; a sample's grid (normalised
to its own image) is mapped into the buffer's frame after clamping to the image's pixels, which is what
padding_mode="border" does on the image alone. The images then equal the loader path's up to float rounding of the
sample positions (~1e-5 px), and the masks up to nearest-neighbour ties that rounding flips (tests/test_data_path.py
measures both).
"""
import numpy as np
import torch
import torch.nn.functional as F

import common
import errors
from distributed import log

MODES = ("auto", "on", "off")
FREE_MEMORY_SHARE = 0.5  # auto: on when the split takes at most this share of the device's free memory


def split_bytes(dataset):
    """Bytes the split takes on the device: padded pixels (3) and mask (1) per position, and the cached teacher
    logits (fp16) if the dataset carries them."""
    heights, widths = zip(*(dataset.cache.shapes[i] for i in set(dataset.indices)))
    n = len(dataset.indices)
    logits = dataset.teacher_logits
    return n * max(heights) * max(widths) * 4 + (n * logits.item_bytes if logits is not None else 0)


def resolve(mode, device, nbytes):
    """--data-on-device: on/off as given; auto = on for CUDA when the split fits in FREE_MEMORY_SHARE of the device's
    free memory (the loader path stays the CPU's: measured no faster there, bench_throughput.py)."""
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= FREE_MEMORY_SHARE * free


class DeviceSplit:
    """A training SegmentationDataset's pixels, masks and cached teacher logits on `device`; batch() augments."""

    def __init__(self, dataset, device):
        self.dataset, self.device = dataset, device
        shapes = [dataset.cache.shapes[i] for i in dataset.indices]
        h_max, w_max = max(h for h, _ in shapes), max(w for _, w in shapes)
        n = len(shapes)
        try:
            self.pixels = torch.zeros((n, h_max, w_max, 3), dtype=torch.uint8, device=device)
            self.masks = torch.zeros((n, h_max, w_max), dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise errors.UserError(f"--data-on-device on: the training split ({n} images padded to {h_max} x {w_max}) "
                                   f"does not fit in {device}'s memory; use --data-on-device auto or off") from None
        for j, i in enumerate(dataset.indices):  # one image at a time: no host copy of the whole split
            img, mask = dataset.cache.get(i)
            h, w = mask.shape
            self.pixels[j, :h, :w] = torch.from_numpy(np.array(img)).to(device)
            self.masks[j, :h, :w] = torch.from_numpy(np.array(mask)).to(device)
        self.sizes = torch.tensor([(h, w) for h, w in shapes], dtype=torch.float32, device=device)
        self.frame = torch.tensor([w_max, h_max], dtype=torch.float32, device=device)  # grid order: (x, y)
        self.indices = torch.tensor(dataset.indices, dtype=torch.int64)
        logits = dataset.teacher_logits
        self.teacher_logits = None if logits is None else logits.stack(dataset.indices).to(device)
        self.mean = torch.tensor(common.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(common.IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.pixels, self.masks)) + (
            0 if self.teacher_logits is None else self.teacher_logits.numel() * 2)

    def batch(self, ks, epoch):
        """The augmented batch of dataset items ks (positions in dataset.indices) in epoch, as the loader path's
        collate gives it: image (B, 3, S, S) normalised, mask (B, S, S) int64 with 255 outside the image, grid,
        index (and teacher_logits, at native resolution, when cached)."""
        positions = torch.tensor(ks, dtype=torch.int64)
        boxes = torch.tensor([self.dataset.box(int(self.indices[k]), epoch) for k in ks], dtype=torch.float64)
        grid = common.grids_from_boxes(boxes.to(self.device, non_blocking=True), self.dataset.image_size)
        pos = positions.to(self.device, non_blocking=True)
        buffer_grid = self.to_buffer_frame(grid, self.sizes[pos].flip(-1)[:, None, None, :])
        outside = common.outside_image(grid)[:, None]
        img = self.pixels[pos].permute(0, 3, 1, 2).float().div_(255)
        img = F.grid_sample(img, buffer_grid, mode="bilinear", padding_mode="border", align_corners=False)
        img = (img.masked_fill_(outside, 0) - self.mean) / self.std
        mask = F.grid_sample(self.masks[pos][:, None].float(), buffer_grid, mode="nearest", padding_mode="border",
                             align_corners=False).long().masked_fill_(outside, common.IGNORE_INDEX)[:, 0]
        batch = {"image": img, "index": self.indices[positions].to(self.device), "mask": mask, "grid": grid}
        if self.teacher_logits is not None:
            batch["teacher_logits"] = self.teacher_logits[pos]
        return batch

    def to_buffer_frame(self, grid, size_xy):
        """A grid normalised to each sample's own image (size_xy: its width, height) -> the buffer's frame, its
        points clamped to the image's pixels first (padding_mode="border" on the image alone)."""
        pixel = ((grid + 1) * size_xy - 1) / 2
        pixel = torch.minimum(pixel.clamp_min(0), size_xy - 1)
        return (2 * pixel + 1) / self.frame - 1


class DeviceBatches:
    """One epoch's batches of a DeviceSplit in a given order (this process's share, as the loader path's), with a
    length like a DataLoader's."""

    def __init__(self, split, order, batch_size, epoch):
        self.split, self.order, self.batch_size, self.epoch = split, order, batch_size, epoch

    def __len__(self):
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.split.batch(self.order[start:start + self.batch_size], self.epoch)


def describe(split_on_device, nbytes, mode, workers):
    """The start-up line of the choice."""
    where = "on the device" if split_on_device else f"read by {workers} loader worker(s)" if workers else \
        "read in the main process"
    log(f"training data: {where} (--data-on-device {mode}; the split takes {nbytes / 2 ** 20:.1f} MB there)")
