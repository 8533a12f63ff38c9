"""Baseline: train the student (or fine-tune the teacher) with class-weighted cross-entropy alone.

    python train_baseline.py --toy --epochs 5                     # offline, synthetic data, minutes on a CPU
    python train_baseline.py --data-dir ./data                    # PASCAL VOC 2012 (downloaded on first use)
    python train_baseline.py --model teacher --toy --epochs 3     # fine-tune the FCN-ResNet50 teacher
    python train_baseline.py --toy --out-dir checkpoints/b --resume   # continue an interrupted run
"""
import argparse

import torch.nn as nn

import common
import engine
import errors


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train a segmentation model with weighted cross-entropy.")
    engine.add_training_args(parser)
    parser.add_argument("--model", choices=("student", "teacher"), default="student",
                        help="student (LightweightDeepLabV3) or teacher (FCN-ResNet50) (default: %(default)s)")
    return parser


def make_compute_loss(criterion):
    """compute_loss(net, batch) -> (loss, {term: value}) of the baseline: weighted CE alone."""
    def compute_loss(net, batch):
        ce = criterion(net(batch["image"]), batch["mask"])
        return ce, {"ce": ce}
    return compute_loss


def main(args):
    cfg = engine.setup(args, strategy=f"baseline-{args.model}")
    # the model first: missing pretrained weights fail before any slow data work
    model = common.build_model(args.model, cfg.data.num_classes, pretrained=not args.no_pretrained)
    engine.load_initial_weights(model, args.init_weights)
    datasets = common.build_datasets(cfg.data)
    class_weights = common.compute_class_weights(datasets["train"])
    criterion = nn.CrossEntropyLoss(weight=class_weights.to(cfg.device), ignore_index=common.IGNORE_INDEX)
    return engine.train(model, make_compute_loss(criterion), datasets, criterion, cfg)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
