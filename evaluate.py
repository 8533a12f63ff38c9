"""Evaluate a checkpoint: mIoU, pixel accuracy and per-class IoU at each image's original resolution.

    python evaluate.py --weights checkpoints/baseline-student_XXXX/best.pth --toy
    python evaluate.py --weights best.pth --data-dir ./data --json metrics.json --save-predictions preds/
    python evaluate.py --weights best.pth --toy --save-vis vis --analysis plots --html browse
    python evaluate.py --runs checkpoints/* --toy --comparison comparison      # several models, same images
    python evaluate.py --weights best.pth --data-dir ./data --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip

--scales/--flip: multi-scale (and mirrored) evaluation; each scale's input is the image resized as in the
single-scale path but to round(image_size * s); every output's logits are resized bilinearly to the image's original
resolution and turned into probabilities, averaged over scales and flips; the prediction is their argmax.
"""
import time
import argparse
import dataclasses
import html
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import common
import engine
import errors
import fileio
import flags
import plots
import voc
from distributed import gather_dict, init_distributed, is_main


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate a student or teacher checkpoint on a VOC-format split.")
    parser.add_argument("--weights", nargs="+", default=[], help="checkpoint(s) written by a train_*.py script, or "
                        "bare state_dicts; several are compared on the same images")
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR",
                        help="run folders to compare (their best.pth), e.g. checkpoints/*")
    parser.add_argument("--comparison", default="checkpoints/comparison", metavar="DIR",
                        help="where a comparison of several models goes: comparison.md/.csv, miou_vs_epoch.png, "
                             "side_by_side.png (default: %(default)s)")
    flags.add_data_args(parser, "checkpoint", trains=False)
    parser.add_argument("--split", default="val", help="ImageSets/Segmentation list to evaluate (default: %(default)s)")
    parser.add_argument("--batch-size", type=flags.positive_int, default=8, help="batch size (default: %(default)s)")
    flags.add_multiscale_args(parser)
    engine.add_amp_arg(parser, trains=False)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON to PATH")
    parser.add_argument("--save-predictions", default=None, metavar="DIR",
                        help="write each prediction as a VOC-palette PNG named by image id")
    parser.add_argument("--save-vis", default=None, metavar="DIR", help="write panels (image | ground truth | "
                        "prediction | errors) of the worst and best images by per-image mIoU to DIR")
    parser.add_argument("--num-vis", type=flags.positive_int, default=8,
                        help="panels for --save-vis: half worst, half best (default: %(default)s)")
    parser.add_argument("--html", default=None, metavar="DIR", help="write DIR/index.html: every image, ground truth "
                        "and prediction with its mIoU, sortable; opens from disk, no server or network")
    parser.add_argument("--browse", action="store_true", help="interactive viewer (arrows: next/previous, w: jump to "
                        "the worst image, o: toggle overlay); needs a display, else use --html")
    parser.add_argument("--analysis", default=None, metavar="DIR", help="write per_class_iou.png (sorted bar chart, "
                        "mean marked) and confusion.png (row-normalised confusion matrix) to DIR")
    return parser


def class_names(num_classes):
    if num_classes == len(common.VOC_CLASSES):
        return list(common.VOC_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


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
    cm.update(torch.from_numpy(np.array(mask, dtype=np.int64)), torch.from_numpy(np.array(pred, dtype=np.int64)))
    return cm.compute()["miou"]


def select_worst_best(scores, n):
    """Indices of the ceil(n/2) lowest and floor(n/2) highest scores (each index once), worst first."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    worst = order[:(n + 1) // 2]
    best = [i for i in reversed(order) if i not in worst][:n // 2]
    return worst + best


def colorize(mask):
    palette = np.array(voc.voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.asarray(mask)]


def save_panel(image, mask, pred, names, title, path):
    """image | ground truth | prediction | errors (wrong red, ignore grey), with a legend of the classes shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    valid = mask != common.IGNORE_INDEX
    wrong = (image * 0.35).astype(np.uint8)
    wrong[valid & (pred != mask)] = (255, 40, 40)
    wrong[~valid] = (128, 128, 128)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, img, label in zip(axes, (image, colorize(mask), colorize(pred), wrong),
                              ("image", "ground truth", "prediction", "errors (red), ignore (grey)")):
        ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    present = sorted(set(np.unique(mask).tolist()) | set(np.unique(pred).tolist()) - {common.IGNORE_INDEX})
    palette = np.array(voc.voc_palette()).reshape(256, 3) / 255
    fig.legend(handles=[Patch(color=palette[c], label=names[c]) for c in present if c < len(names)],
               loc="lower center", ncol=min(len(present), 8), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def predict_image(model, dataset, k, device, flip=False):
    """Prediction for dataset item k at its mask's resolution (at the dataset's scales, mirrored too with flip)."""
    model.eval()
    item = dataset[k]
    views = [v[None] for v in item.get("views", (item["image"],))]
    return engine.segment(model, views, [item["mask"].shape], device, flip=flip)[0].argmax(1)[0].cpu().numpy()


@torch.no_grad()
def save_visualisations(model, dataset, scores, names, device, out_dir, n, flip=False):
    """Panels of the worst and best images by per-image mIoU (predicted again, one image at a time)."""
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    written = []
    for rank, k in enumerate(select_worst_best(scores, n)):
        image, _ = dataset.cache.get(dataset.indices[k])
        mask = dataset[k]["mask"].numpy()
        pred = predict_image(model, dataset, k, device, flip)
        if image.shape[:2] != mask.shape:  # --eval-size: show the image at the metric's resolution
            image = common.warp_image(image, common.sample_grid(*image.shape[:2], mask.shape[0])).numpy()
            image = np.clip((image * np.array(common.IMAGENET_STD)[:, None, None] +
                             np.array(common.IMAGENET_MEAN)[:, None, None]) * 255, 0, 255)
            image = image.astype(np.uint8).transpose(1, 2, 0)
        image_id = dataset.cache.ids[dataset.indices[k]]
        path = os.path.join(out_dir, f"{rank:02d}_{image_id}.png")
        save_panel(np.asarray(image), mask, pred, names, f"{image_id}: image mIoU {scores[k]:.1f}", path)
        written.append(path)
    return written


HTML_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px;text-align:center}} th{{cursor:pointer;background:#eee}} img{{height:{h}px}}</style></head>
<body data-ready="0"><h2>{title}</h2><p>{summary} Click a column header to sort.</p>
<table id="t"><thead><tr><th data-k="s">image id</th><th data-k="n">image mIoU (%)</th><th>image</th>
<th>ground truth</th><th>prediction</th></tr></thead><tbody>
{rows}
</tbody></table>
<script>
const tbody = document.querySelector("#t tbody");
document.querySelectorAll("th[data-k]").forEach((th, col) => th.addEventListener("click", () => {{
  const rows = [...tbody.rows], up = th.dataset.dir !== "up";
  rows.sort((a, b) => {{
    const x = a.cells[col].textContent, y = b.cells[col].textContent;
    const d = th.dataset.k === "n" ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
    return up ? d : -d; }});
  th.dataset.dir = up ? "up" : "down";
  rows.forEach(r => tbody.appendChild(r)); }}));
document.body.dataset.ready = "1";
</script></body></html>
"""


def write_html_assets(out_dir, image_id, image, mask, pred):
    """Image, coloured ground truth and prediction of one image for the --html page."""
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    if image.shape[:2] != mask.shape:
        image = np.asarray(Image.fromarray(image).resize(mask.shape[::-1], Image.BILINEAR))
    Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(out_dir, "img", image_id + ".jpg"), quality=90)
    Image.fromarray(colorize(mask)).save(os.path.join(out_dir, "img", image_id + "_gt.png"))
    Image.fromarray(colorize(pred)).save(os.path.join(out_dir, "img", image_id + "_pred.png"))


def write_html(out_dir, rows, title, summary, height=120):
    """DIR/index.html: one table row per (image id, image mIoU), images referenced relatively."""
    body = "\n".join(
        f'<tr><td>{html.escape(i)}</td><td>{m:.2f}</td><td><img src="img/{i}.jpg"></td>'
        f'<td><img src="img/{i}_gt.png"></td><td><img src="img/{i}_pred.png"></td></tr>' for i, m in rows)
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(HTML_TEMPLATE.format(title=html.escape(title), summary=html.escape(summary), rows=body, h=height))


def check_display():
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise errors.UserError("--browse needs a display and this machine has none ($DISPLAY is unset); "
                               "use --html DIR and open DIR/index.html in a browser instead")


def browse(dataset, predictions, scores, names):
    """Matplotlib viewer: left/right = previous/next, w = worst image, o = prediction overlay on/off."""
    import matplotlib.pyplot as plt
    make_browser(dataset, predictions, scores, names)
    plt.show()


def make_browser(dataset, predictions, scores, names):
    """The viewer's figure with its key bindings; returns (figure, state)."""
    import matplotlib.pyplot as plt
    state = {"k": 0, "overlay": False}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))

    def draw():
        k = state["k"]
        image, _ = dataset.cache.get(dataset.indices[k])
        mask, pred = dataset[k]["mask"].numpy(), predictions[k]
        if image.shape[:2] != mask.shape:
            image = np.asarray(Image.fromarray(np.asarray(image)).resize(mask.shape[::-1]))
        shown = (0.5 * image + 0.5 * colorize(pred)).astype(np.uint8) if state["overlay"] else image
        panels = (shown, colorize(mask), colorize(pred))
        for ax, img, label in zip(axes, panels, ("image", "ground truth", "prediction")):
            ax.clear()
            ax.imshow(img)
            ax.set_title(label)
            ax.axis("off")
        fig.suptitle(f"{k + 1}/{len(dataset)} {dataset.cache.ids[dataset.indices[k]]}: image mIoU {scores[k]:.1f}"
                     "   [left/right, w: worst, o: overlay]")
        fig.canvas.draw_idle()

    def on_key(event):
        if event.key in ("right", "left"):
            state["k"] = (state["k"] + (1 if event.key == "right" else -1)) % len(dataset)
        elif event.key == "w":
            state["k"] = int(np.argmin(scores))
        elif event.key == "o":
            state["overlay"] = not state["overlay"]
        draw()

    fig.canvas.mpl_connect("key_press_event", on_key)
    draw()
    return fig, state


def plot_analysis(metrics, names, out_dir):
    """per_class_iou.png and confusion.png for one evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    pairs = sorted(((iou, n) for n, iou in zip(names, metrics["iou_per_class"]) if not math.isnan(iou)), reverse=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([n for _, n in pairs], [v for v, _ in pairs], color="tab:blue")
    ax.axhline(metrics["miou"], color="tab:red", linestyle="--", label=f"mIoU {metrics['miou']:.1f}")
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
    weights = list(args.weights) + [os.path.join(r, "best.pth") for r in args.runs]
    if not weights:
        raise errors.UserError("give --weights PATH [PATH ...] or --runs RUN_DIR [RUN_DIR ...]")
    if args.browse and "RANK" in os.environ:
        raise errors.UserError("--browse is interactive: run it without torchrun (other output flags work under it)")
    if int(os.environ.get("RANK", 0)) == 0:  # (before the process group exists) rank 0 alone writes the outputs
        check_outputs(args, several=len(weights) > 1)
    if len(weights) == 1:
        return evaluate_weights(args, weights[0])["metrics"]
    single = [f for f in ("json", "save_predictions", "save_vis", "html", "analysis", "browse") if getattr(args, f)]
    if single:
        raise errors.UserError(f"--{single[0].replace('_', '-')} takes one model; run evaluate.py per model for it "
                               f"(several --weights/--runs write a comparison to --comparison {args.comparison})")
    results = [evaluate_weights(args, w, per_image=True) for w in weights]
    if is_main():
        write_comparison(results, args.comparison, min(args.num_vis, 4))
    return [r["metrics"] for r in results]


def run_timing(weights):
    """(backend, median latency ms) of the fastest backend in a timing JSON beside the checkpoint, if any."""
    folder = os.path.dirname(os.path.abspath(weights))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            try:
                data = fileio.read_json(os.path.join(folder, name))
            except ValueError:  # not a timing file we can read: it has no latency to show
                continue
            if isinstance(data, dict) and isinstance(data.get("backends"), dict):
                timed = {b: r["latency_ms_median"] for b, r in data["backends"].items() if "latency_ms_median" in r}
                if timed:
                    best = min(timed, key=timed.get)
                    return best, timed[best]
    return None


def run_histories(weights):
    """{weights: history} of the runs whose folder holds a history.json; a damaged one is left out of the plot with
    one line naming it, the other models' figures still written."""
    histories = {}
    for w in weights:
        path = os.path.join(os.path.dirname(os.path.abspath(w)), "history.json")
        if os.path.isfile(path):
            try:
                histories[w] = engine.read_history(path)
            except errors.UserError as e:
                fileio.warn(f"{e} (left out of miou_vs_epoch.png)")
    return histories


def write_comparison(results, out_dir, n_images):
    """comparison.md/.csv (one row per model), miou_vs_epoch.png (from each run's history.json) and
    side_by_side.png (the same images, worst and best by the first model, predicted by every model)."""
    import csv
    os.makedirs(out_dir, exist_ok=True)
    names = results[0]["names"]
    header = ["model", "strategy", "params", "val_miou", "pixel_acc", "latency_ms"] + [f"iou_{n}" for n in names]
    rows = []
    for r in results:
        timing = run_timing(r["weights"])
        rows.append([r["weights"], r["strategy"], r["params"], round(r["metrics"]["miou"], 2),
                     round(r["metrics"]["pixel_acc"], 2),
                     "" if timing is None else f"{timing[1]:.2f} ({timing[0]})"]
                    + ["" if math.isnan(v) else round(v, 2) for v in r["metrics"]["iou_per_class"]])
    with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write("| " + " | ".join(header[:6]) + " |\n|" + "---|" * 6 + "\n")
        f.writelines("| " + " | ".join(str(v) for v in row[:6]) + " |\n" for row in rows)
    histories = run_histories([r["weights"] for r in results])
    if histories:
        plots.plot_runs_miou(histories, os.path.join(out_dir, "miou_vs_epoch.png"))
    first = results[0]
    picks = select_worst_best(first["scores"], n_images)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(picks), 2 + len(results), figsize=(2.6 * (2 + len(results)), 2.6 * len(picks)),
                             squeeze=False)
    for row, k in enumerate(picks):
        image, _ = first["dataset"].cache.get(first["dataset"].indices[k])
        mask = first["dataset"][k]["mask"].numpy()
        panels = [(np.asarray(image), "image"), (colorize(mask), "ground truth")]
        for r in results:
            pred = predict_image(r["model"], r["dataset"], k, r["device"], r["flip"])
            panels.append((colorize(pred), f"{r['strategy']} ({image_miou(mask, pred, len(names)):.0f})"))
        for ax, (img, title) in zip(axes[row], panels):
            ax.imshow(img)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "side_by_side.png"), dpi=80)
    plt.close(fig)
    print("\n".join(open(os.path.join(out_dir, "comparison.md")).read().splitlines()))
    print(f"comparison written to {out_dir}/ (comparison.md, comparison.csv, miou_vs_epoch.png, side_by_side.png)")


def load_for_evaluation(args, weights):
    """(LoadedModel, DataConfig, device) for one checkpoint: evaluated at the size it was trained at unless
    --image-size says otherwise, with the class count it predicts."""
    loaded = common.load_model(weights)
    trained = loaded.checkpoint.get("args", {})
    if args.num_classes != loaded.num_classes and args.num_classes != len(common.VOC_CLASSES):
        raise errors.UserError(f"--num-classes {args.num_classes} but {weights} predicts {loaded.num_classes} classes")
    data = common.data_config(args, trained_image_size=trained.get("image_size"))
    data = dataclasses.replace(data, num_classes=loaded.num_classes)
    device = init_distributed(args.device)
    return loaded, data, device


def evaluate_weights(args, weights, per_image=False):
    """Evaluate one checkpoint with every per-model output the flags ask for; returns what a comparison needs."""
    loaded, data, device = load_for_evaluation(args, weights)
    dataset = common.build_datasets(data, (args.split,), augment_train=False, scales=args.scales)[args.split]
    loader = engine.make_loader(dataset, args.batch_size, data.workers)
    per_image = per_image or bool(args.save_vis or args.html or args.browse)
    scores, predictions = {}, {}  # dataset position -> per-image mIoU / prediction (for --browse)

    def on_prediction(k, pred):  # items are numbered like the cache; evaluation uses its first len(dataset) items
        mask = dataset[k]["mask"].numpy() if per_image else None
        if per_image:
            scores[k] = image_miou(mask, pred, loaded.num_classes)
        if args.html:
            write_html_assets(args.html, dataset.cache.ids[k], np.asarray(dataset.cache.get(k)[0]), mask, pred)
        if args.browse:
            predictions[k] = pred
        if args.save_predictions:
            voc.save_mask_png(pred, os.path.join(args.save_predictions, dataset.cache.ids[k] + ".png"))

    if args.save_predictions:
        os.makedirs(args.save_predictions, exist_ok=True)
    model = loaded.model.to(device)
    t0 = time.perf_counter()
    metrics = engine.compute_metrics(model, loader, device, loaded.num_classes,
                                     precision=engine.resolve_amp(args.amp, device), on_prediction=on_prediction,
                                     flip=args.flip)
    metrics["seconds"] = time.perf_counter() - t0
    names = class_names(loaded.num_classes)
    scores = gather_dict(scores)  # under torchrun each process scored its share of the images
    ordered = [scores[k] for k in range(len(dataset))] if per_image else None
    if is_main():  # rank 0 alone prints and writes; prediction PNGs and HTML images were written by each rank
        report(args, weights, loaded, data, metrics, names, engine.resolve_amp(args.amp, device))
        write_outputs(args, weights, loaded, model, dataset, metrics, names, ordered, predictions, device)
    return {"metrics": metrics, "weights": weights, "arch": loaded.arch,
            "strategy": loaded.checkpoint.get("args", {}).get("strategy", loaded.arch),
            "params": common.count_params(model), "names": names, "scores": ordered, "model": model,
            "dataset": dataset, "device": device, "flip": args.flip}


def report(args, weights, loaded, data, metrics, names, precision):
    """The printed report (per-class IoU, most confused pairs, summary) and --json."""
    views = (f"scales {','.join(f'{s:g}' for s in args.scales)}{' + flip' if args.flip else ''}"
             if args.scales != (1.0,) or args.flip else "single scale")
    print(f"{loaded.arch} {weights} on {data.data_dir}{' (toy)' if data.toy else ''} [{args.split}], "
          f"{metrics['num_images']} images, input {data.image_size}px, {views}, precision {precision}, "
          f"metrics at {'original resolution' if not data.eval_size else f'{data.eval_size}px'}")
    print(f"{'class':>14s}  IoU")
    for name, iou in zip(names, metrics["iou_per_class"]):
        print(f"{name:>14s}  {'  n/a' if math.isnan(iou) else f'{iou:5.1f}'}")
    print("most confused (ground truth -> predicted: share of its pixels):")
    for true, pred, frac, pixels in most_confused_pairs(metrics["confusion"], names):
        print(f"  {true:>14s} -> {pred:<14s} {100 * frac:5.1f}%  ({pixels} px)")
    print(f"mIoU {metrics['miou']:.2f}  pixel acc {metrics['pixel_acc']:.2f}  "
          f"mean class acc {metrics['mean_class_acc']:.2f}  ({metrics['seconds']:.1f} s)")
    if args.json:
        fileio.write_json(args.json, {
            "weights": weights, "arch": loaded.arch, "split": args.split, "image_size": data.image_size,
            "scales": list(args.scales), "flip": args.flip, "seconds": metrics["seconds"], "precision": precision,
            "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
            "mean_class_acc": metrics["mean_class_acc"], "num_images": metrics["num_images"],
            "iou_per_class": {n: (None if math.isnan(v) else v) for n, v in zip(names, metrics["iou_per_class"])}})
        print(f"wrote {args.json}")


def write_outputs(args, weights, loaded, model, dataset, metrics, names, ordered, predictions, device):
    """--analysis, --save-vis, --html, --save-predictions (written during evaluation) and --browse."""
    if args.save_predictions:
        print(f"wrote {len(dataset)} predictions to {args.save_predictions}/")
    if args.analysis:
        plot_analysis(metrics, names, args.analysis)
        print(f"wrote {args.analysis}/per_class_iou.png and confusion.png")
    if args.save_vis:
        written = save_visualisations(model, dataset, ordered, names, device, args.save_vis,
                                      min(args.num_vis, len(dataset)), args.flip)
        print(f"wrote {len(written)} panels (worst and best images) to {args.save_vis}/")
    if args.html:
        write_html(args.html, [(dataset.cache.ids[k], ordered[k]) for k in range(len(dataset))],
                   f"{loaded.arch}: {weights}", f"{args.split}: {metrics['num_images']} images, mIoU "
                   f"{metrics['miou']:.2f}, pixel acc {metrics['pixel_acc']:.2f}.")
        print(f"wrote {os.path.join(args.html, 'index.html')}")
    if args.browse:
        browse(dataset, predictions, ordered, names)


def check_outputs(args, several):
    """Fail before any work when an output path cannot be written (not after a whole evaluation)."""
    if args.browse:
        check_display()
    if args.json:
        fileio.check_output_file(args.json, "--json")
    folders = ["save_predictions", "save_vis", "html", "analysis"]
    for flag in folders + ["comparison"] * several:
        folder = getattr(args, flag)
        if folder:
            fileio.check_output_dir(folder, f"--{flag.replace('_', '-')}")


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
