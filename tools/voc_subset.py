"""Copy a small real-VOC subset (train and val halves, at most --max-mb) into a folder of this repo, so it can travel
to a machine without ../shared (a GPU box): the benchmark and the tests then read real JPEGs and palette PNGs.

    python tools/voc_subset.py ../shared/voc_sample voc_subset --max-mb 20
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import errors  # noqa: E402
import flags  # noqa: E402
import voc  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description="Copy a size-capped VOC subset.")
    parser.add_argument("src", help="a folder holding VOCdevkit/VOC2012 (or VOC2012)")
    parser.add_argument("dst", help="where to write DST/VOCdevkit/VOC2012")
    parser.add_argument("--max-mb", type=flags.positive_float, default=20.0, help="size cap (default: %(default)s)")
    return parser


def main(args):
    root = voc.find_voc_root(args.src)
    if root is None:
        raise errors.UserError(f"no VOC dataset under {args.src}")
    out = os.path.join(args.dst, "VOCdevkit", "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    budget = args.max_mb * 2 ** 20 / 2  # half for each split
    for split in ("train", "val"):
        kept, used = [], 0
        for image_id, img, mask in voc.split_pairs(root, split):
            size = os.path.getsize(img) + os.path.getsize(mask)
            if used + size > budget:
                break
            shutil.copyfile(img, os.path.join(out, "JPEGImages", image_id + ".jpg"))
            shutil.copyfile(mask, os.path.join(out, "SegmentationClass", image_id + ".png"))
            kept.append(image_id)
            used += size
        with open(os.path.join(out, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("\n".join(kept) + "\n")
        print(f"{split}: {len(kept)} images, {used / 2 ** 20:.1f} MB -> {out}")


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
