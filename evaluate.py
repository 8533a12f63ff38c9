"""Evaluate a checkpoint: mIoU, pixel accuracy and per-class IoU at each image's original resolution.

    python evaluate.py --weights checkpoints/baseline-student_XXXX/best.pth --toy
    python evaluate.py --weights best.pth --data-dir ./data --json metrics.json --save-predictions preds/
"""
import argparse
import json
import math
import os

import torch

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
    parser.add_argument("--analysis", default=None, metavar="DIR", help="write per_class_iou.png (sorted bar chart, "
                        "mean marked) and confusion.png (row-normalised confusion matrix) to DIR")
    return parser


def class_names(num_classes):
    return list(common.VOC_CLASSES) if num_classes == len(common.VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def most_confused_pairs(confusion, names, k=5):
    """The k largest off-diagonal entries of the row-normalised confusion matrix:
    (true class, predicted class, fraction of the true class's pixels, pixels)."""
    m = confusion.double()
    rows = m.sum(1, keepdim=True).clamp(min=1)
    frac = m / rows
    frac.fill_diagonal_(0)
    order = torch.argsort(frac.flatten(), descending=True)[:k]
    c = m.shape[0]
    return [(names[i // c], names[i % c], float(frac.flatten()[i]), int(m.flatten()[i]))
            for i in order.tolist() if frac.flatten()[i] > 0]


def plot_analysis(metrics, names, out_dir):
    """per_class_iou.png and confusion.png for one evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    pairs = sorted(((iou, n) for n, iou in zip(names, metrics["iou_per_class"]) if not math.isnan(iou)), reverse=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([n for _, n in pairs], [100 * v for v, _ in pairs], color="tab:blue")
    ax.axhline(100 * metrics["miou"], color="tab:red", linestyle="--", label=f"mIoU {100 * metrics['miou']:.1f}")
    ax.set(ylabel="IoU (%)", title="Per-class IoU", ylim=(0, 100))
    ax.tick_params(axis="x", rotation=60)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "per_class_iou.png"), dpi=100)
    plt.close(fig)
    m = metrics["confusion"].double()
    norm = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="ground truth", title="Confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "confusion.png"), dpi=100)
    plt.close(fig)


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
    print("most confused (ground truth -> predicted: share of its pixels):")
    for true, pred, frac, pixels in most_confused_pairs(metrics["confusion"], names):
        print(f"  {true:>14s} -> {pred:<14s} {100 * frac:5.1f}%  ({pixels} px)")
    if args.analysis:
        plot_analysis(metrics, names, args.analysis)
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
