"""Evaluate a checkpoint: mIoU, pixel accuracy and per-class IoU at each image's original resolution.

    python evaluate.py --weights checkpoints/baseline-student_XXXX/best.pth --toy
    python evaluate.py --weights best.pth --data-dir ./data --json metrics.json --save-predictions preds/
"""
import argparse
import json
import math
import os

import numpy as np
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
    parser.add_argument("--save-vis", default=None, metavar="DIR", help="write panels (image | ground truth | "
                        "prediction | errors) of the worst and best images by per-image mIoU to DIR")
    parser.add_argument("--num-vis", type=common.positive_int, default=8,
                        help="panels for --save-vis: half worst, half best (default: %(default)s)")
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


def image_miou(mask, pred, num_classes):
    """mIoU of one image over the classes present in its ground truth or prediction (255 ignored)."""
    cm = common.ConfusionMatrix(num_classes)
    cm.update(torch.as_tensor(mask, dtype=torch.int64), torch.as_tensor(pred, dtype=torch.int64))
    return cm.compute()["miou"]


def select_worst_best(scores, n):
    """Indices of the ceil(n/2) lowest and floor(n/2) highest scores (each index once), worst first."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    worst = order[:(n + 1) // 2]
    best = [i for i in reversed(order) if i not in worst][:n // 2]
    return worst + best


def colorize(mask):
    palette = np.array(common.voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.asarray(mask)]


def save_panel(image, mask, pred, names, title, path):
    """image | ground truth | prediction | errors (wrong red, ignore grey), with a legend of the classes shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    valid = mask != common.IGNORE_INDEX
    errors = (image * 0.35).astype(np.uint8)
    errors[valid & (pred != mask)] = (255, 40, 40)
    errors[~valid] = (128, 128, 128)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, img, label in zip(axes, (image, colorize(mask), colorize(pred), errors),
                              ("image", "ground truth", "prediction", "errors (red), ignore (grey)")):
        ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    present = sorted(set(np.unique(mask).tolist()) | set(np.unique(pred).tolist()) - {common.IGNORE_INDEX})
    palette = np.array(common.voc_palette()).reshape(256, 3) / 255
    fig.legend(handles=[Patch(color=palette[c], label=names[c]) for c in present if c < len(names)],
               loc="lower center", ncol=min(len(present), 8), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def save_visualisations(model, dataset, scores, names, device, out_dir, n):
    """Panels of the worst and best images by per-image mIoU (predicted again, one image at a time)."""
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    written = []
    for rank, k in enumerate(select_worst_best(scores, n)):
        item = dataset[k]
        image, _ = dataset.cache.get(dataset.indices[k])
        mask = item["mask"].numpy()
        logits = model(item["image"][None].to(device)).float()
        pred = torch.nn.functional.interpolate(logits, size=mask.shape, mode="bilinear",
                                               align_corners=False).argmax(1)[0].cpu().numpy()
        if image.shape[:2] != mask.shape:  # --eval-size: show the image at the metric's resolution
            image = common.warp_image(image, common.sample_grid(*image.shape[:2], mask.shape[0])).numpy()
            image = np.clip((image * np.array(common.IMAGENET_STD)[:, None, None] +
                             np.array(common.IMAGENET_MEAN)[:, None, None]) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        image_id = dataset.cache.ids[dataset.indices[k]]
        path = os.path.join(out_dir, f"{rank:02d}_{image_id}.png")
        save_panel(np.asarray(image), mask, pred, names, f"{image_id}: image mIoU {100 * scores[k]:.1f}", path)
        written.append(path)
    return written


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
    if args.save_predictions:
        os.makedirs(args.save_predictions, exist_ok=True)
    scores = {}  # dataset position -> per-image mIoU

    def on_prediction(index, pred):
        k = index  # items are numbered like the cache, and evaluation uses its first len(dataset) items
        scores[k] = image_miou(dataset[k]["mask"].numpy(), pred, num_classes) if args.save_vis else None
        if args.save_predictions:
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
    if args.save_vis:
        ordered = [scores[k] for k in range(len(dataset))]
        save_visualisations(model, dataset, ordered, names, device, args.save_vis, min(args.num_vis, len(dataset)))
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
