"""Baseline: train the student (or fine-tune the teacher) with class-weighted cross-entropy alone.

    python train_baseline.py --toy --epochs 5                     # offline, synthetic data, minutes on a CPU
    python train_baseline.py --data-dir ./data                    # PASCAL VOC 2012 (downloaded on first use)
    python train_baseline.py --model teacher --toy --epochs 3     # fine-tune the FCN-ResNet50 teacher
    python train_baseline.py --toy --out-dir checkpoints/b --resume   # continue an interrupted run
"""
import argparse

import torch.nn as nn

import common


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train a segmentation model with weighted cross-entropy.")
    common.add_training_args(parser)
    parser.add_argument("--model", choices=("student", "teacher"), default="student",
                        help="student (LightweightDeepLabV3) or teacher (FCN-ResNet50) (default: %(default)s)")
    return parser


def main(args):
    device = common.setup_run(args, strategy=f"baseline-{args.model}")
    datasets, _ = common.build_datasets(args)
    class_weights = common.compute_class_weights(datasets["train"])
    model = common.build_model(args.model, args.num_classes, pretrained=not args.no_pretrained)
    criterion = nn.CrossEntropyLoss(weight=class_weights.to(device), ignore_index=common.IGNORE_INDEX)

    def compute_loss(batch):
        ce = criterion(model(batch["image"]), batch["mask"])
        return ce, {"ce": ce}

    common.fit(args, model, compute_loss, datasets, criterion, device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
