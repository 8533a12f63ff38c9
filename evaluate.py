"""Evaluate a checkpoint: mIoU, pixel accuracy and per-class IoU at each image's original resolution.

    python evaluate.py --weights checkpoints/baseline-student_XXXX/best.pth --toy
    python evaluate.py --weights best.pth --data-dir ./data --json metrics.json --save-predictions preds/
"""
import argparse
import json
import math
import os

import common


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate a student or teacher checkpoint on a VOC-format split.")
    parser.add_argument("--weights", required=True, help="checkpoint written by a train_*.py script, or a bare state_dict")
    common.add_data_args(parser)
    parser.add_argument("--split", default="val", help="ImageSets/Segmentation list to evaluate (default: %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON to PATH")
    parser.add_argument("--save-predictions", default=None, metavar="DIR",
                        help="write each prediction as a VOC-palette PNG named by image id")
    return parser


def class_names(num_classes):
    return list(common.VOC_CLASSES) if num_classes == len(common.VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def main(args):
    model, arch, num_classes, ckpt = common.load_model(args.weights)
    trained = ckpt.get("args", {})
    if args.image_size is None and trained.get("image_size"):
        args.image_size = trained["image_size"]  # evaluate at the size the model was trained at
    device = common.setup_run(args, strategy="evaluate")
    if args.num_classes != num_classes:
        if args.num_classes != len(common.VOC_CLASSES):
            raise SystemExit(f"error: --num-classes {args.num_classes} but {args.weights} predicts {num_classes} classes")
        args.num_classes = num_classes
    args.eval_only = True
    datasets, root = common.build_datasets(args, splits=(args.split,))
    dataset = datasets[args.split]
    loader = common.make_loader(dataset, args.batch_size, args.workers)
    on_prediction = None
    if args.save_predictions:
        os.makedirs(args.save_predictions, exist_ok=True)

        def on_prediction(index, pred):
            common.save_mask_png(pred, os.path.join(args.save_predictions, dataset.cache.ids[index] + ".png"))

    metrics = common.evaluate(model.to(device), loader, device, num_classes, amp=args.amp, on_prediction=on_prediction)
    names = class_names(num_classes)
    print(f"{arch} {args.weights} on {root} [{args.split}], {metrics['num_images']} images, "
          f"input {args.image_size}px, metrics at {'original resolution' if not args.eval_size else f'{args.eval_size}px'}")
    print(f"{'class':>14s}  IoU")
    for name, iou in zip(names, metrics["iou_per_class"]):
        print(f"{name:>14s}  {'  n/a' if math.isnan(iou) else f'{100 * iou:5.1f}'}")
    print(f"mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['pixel_acc']:.2f}  "
          f"mean class acc {100 * metrics['mean_class_acc']:.2f}")
    if args.json:
        out = {"weights": args.weights, "arch": arch, "split": args.split, "image_size": args.image_size,
               "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"], "mean_class_acc": metrics["mean_class_acc"],
               "iou_per_class": {n: (None if math.isnan(v) else v) for n, v in zip(names, metrics["iou_per_class"])},
               "num_images": metrics["num_images"]}
        common.write_json(args.json, out)
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
