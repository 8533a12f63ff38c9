"""Does feature KD's pull on the student agree with the labels'? For a feature-KD run: on a few training batches, the
gradient of the label CE and of each weighted feature term on the student's own parameters (adapters left out), their
norms and the cosine between them, for the student as it starts (same seed, fresh weights) and as the run left it.

    python tools/feature_kd_probe.py checkpoints/demo/feature-kd_seed0 --batches 8

A negative cosine means the term pushes the shared weights against the labels; a norm far above CE's means it
dominates the step. The last line of stdout is one JSON document.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import distill  # noqa: E402
import engine  # noqa: E402
import errors  # noqa: E402
import flags  # noqa: E402
import methods  # noqa: E402
from methods import feature_kd  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description="Gradient agreement of feature KD's terms with the label CE.")
    parser.add_argument("run_dir", help="a train_feature_kd.py run folder (its config.json and last.pth)")
    parser.add_argument("--batches", type=flags.positive_int, default=8, help="batches to average (default: 8)")
    return parser


def term_gradients(compute_loss, net, batch, weights):
    """{term: flat gradient on the student's parameters} of CE and each weighted feature term."""
    params = [p for p in net.model.parameters() if p.requires_grad]
    _, parts = compute_loss(net, batch)
    grads = {}
    for name, value in parts.items():
        weight = 1.0 if name == "ce" else weights[name.removeprefix("feat_")]
        g = torch.autograd.grad(weight * value, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
    return grads


def probe(student, adapters, compute_loss, loader, batches, weights):
    """Mean over batches of each term's gradient norm and its cosine with CE's gradient."""
    net = engine.TrainModule(student, adapters).train()
    sums = {}
    for i, batch in enumerate(loader):
        if i == batches:
            break
        grads = term_gradients(compute_loss, net, batch, weights)
        for name, g in grads.items():
            values = {f"{name}_grad_norm": g.norm().item()}
            if name != "ce":
                values[f"{name}_cos_with_ce"] = torch.nn.functional.cosine_similarity(g, grads["ce"], dim=0).item()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value / batches
    return sums


def main(args):
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = {flags.RENAMED.get(k, k): v for k, v in json.load(f).items()}  # a run recorded under the old names
    run_args = methods.get_args_parser(feature_kd).parse_args([])
    run_args.__dict__.update({k: v for k, v in config.items() if k in vars(run_args)})
    run_args.workers, run_args.cache_dir = 0, config["cache_dir"]
    cpu = torch.device("cpu")
    data = common.data_config(run_args)
    dataset = common.build_datasets(data, splits=("train",))["train"]
    criterion = common.weighted_ce(dataset, cpu)
    teacher = distill.build_frozen_teacher(config["teacher_weights"], data.num_classes, cpu, "fp32")
    weights = {"stage16": config["feat_stage16_weight"], "head": config["feat_head_weight"]}
    loader = engine.make_loader(dataset, config["batch_size"], 0, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
    result = {}
    torch.manual_seed(config["seed"])
    states = {"start": (common.build_student(data.num_classes, pretrained=False), feature_kd.build_adapters())}
    ckpt = common.read_checkpoint(os.path.join(args.run_dir, "last.pth"), "run_dir")
    trained, adapters = common.build_student(data.num_classes, pretrained=False), feature_kd.build_adapters()
    trained.load_state_dict(ckpt["model"])
    adapters.load_state_dict(ckpt["adapters"])
    states[f"after epoch {ckpt['epoch']}"] = (trained, adapters)
    for label, (student, adapters) in states.items():
        compute_loss = feature_kd.make_compute_loss(criterion, teacher, "fp32", adapters, weights)
        result[label] = probe(student, adapters, compute_loss, loader, args.batches, weights)
        print(f"{label:>16s}: " + "  ".join(f"{k} {v:.4f}" for k, v in result[label].items()), flush=True)
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
