"""The training methods (the baseline and every distillation method) as plug-ins: one module each in this folder,
found by the registry, so compare.py, bench_throughput.py, demo.py and the tests never name a method.

A method module holds
    NAME         its strategy name (compare.py --strategies, the run's "strategy")
    TEACHER      what it needs of the teacher: "none"; "logits" (read from the teacher-logit cache, or the live
                 teacher with --no-teacher-cache); "features" (the live teacher's logits and features)
    TERMS        its loss terms, as history.json names them (train_loss_<term>)
    ORDER        its place in lists and tables
    DESCRIPTION  one line for --help
    add_args(parser)            its own flags (flags.add_tau, flags.add_weight: --tau, --<term>-weight)
    build_loss(args, context)   -> Loss: compute_loss(net, batch) -> (loss, {term: value}) and the modules that train
                                with the student (adapters, generators: saved as the checkpoint's "adapters")
and may hold VARIANTS ({strategy: {flag: value}}, e.g. response-kd-live), OLD_FLAGS (renamed flags whose old names
still work, keys of flags.RENAMED) and run_name(args) (the run's strategy name, if not NAME). A thin train_<name>.py
makes it a command: get_args_parser() and main(args) from here.
"""
import argparse
import dataclasses
import functools
import importlib
import pkgutil
import typing

import torch.nn as nn

import common
import distill
import engine
import fileio
import flags


class Loss(typing.NamedTuple):
    """What build_loss returns: the loss of a batch and the modules that train with the student."""
    compute_loss: typing.Callable  # (net, batch) -> (loss, {term: value})
    modules: nn.ModuleDict | None = None  # trained with the student, saved as the checkpoint's "adapters"


class Context(typing.NamedTuple):
    """What a method's loss is built from: the label loss and the teacher (None: its logits come with each batch,
    from the teacher-logit cache)."""
    criterion: nn.Module
    teacher: nn.Module | None
    teacher_dtype: str | None


@functools.cache
def registry():
    """{NAME: method module}, in ORDER: every module of this folder."""
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {m.NAME: m for m in sorted(found, key=lambda m: m.ORDER)}


def strategies():
    """{strategy: (method module, {flag dest: value} set otherwise than its defaults)}: every method, then its
    variants, in the registry's order."""
    out = {}
    for name, method in registry().items():
        out[name] = (method, {})
        out.update({variant: (method, fixed) for variant, fixed in getattr(method, "VARIANTS", {}).items()})
    return out


def script_name(method):
    """The method's command: train_<name>.py."""
    return f"train_{method.NAME.replace('-', '_')}.py"


def get_args_parser(method):
    """The method's command line: the training loop's flags, the teacher's (if it has one), its own."""
    parser = argparse.ArgumentParser(description=method.DESCRIPTION)
    engine.add_training_args(parser)
    if method.TEACHER != "none":
        distill.add_teacher_args(parser)
    if method.TEACHER == "logits":
        distill.add_logit_cache_arg(parser)
    method.add_args(parser)
    flags.add_deprecated_aliases(parser, getattr(method, "OLD_FLAGS", ()))
    return parser


def main(method, args):
    """Train with the method: set-up, teacher (before any slow data work, so missing weights fail first), student,
    data, the weighted CE, the method's loss, then engine.train. Returns the history."""
    cfg = engine.setup(args, strategy=method.run_name(args) if hasattr(method, "run_name") else method.NAME)
    teacher, teacher_dtype = None, None
    if method.TEACHER != "none":
        teacher_dtype = distill.resolve_teacher_dtype(args.teacher_dtype, cfg.device)
        # recorded with the flags; the teacher by its content, so the same file under another path is the same run
        teacher_file = fileio.file_record(args.teacher_weights) if args.teacher_weights else None
        cfg = dataclasses.replace(cfg, flags=dict(cfg.flags, teacher_dtype=teacher_dtype, teacher_file=teacher_file))
        teacher = distill.build_frozen_teacher(args.teacher_weights, cfg.data.num_classes, cfg.device, teacher_dtype)
    arch = getattr(args, "model", "student")
    model = common.build_model(arch, cfg.data.num_classes, pretrained=not args.no_pretrained)
    engine.load_initial_weights(model, args.init_weights)
    datasets = common.build_datasets(cfg.data)
    criterion = common.weighted_ce(datasets["train"], cfg.device)
    if method.TEACHER == "logits":
        teacher = distill.logit_source(teacher, datasets["train"], cfg.device, args.batch_size, cfg.data.workers,
                                       teacher_dtype, args.no_teacher_cache)
    loss = method.build_loss(args, Context(criterion, teacher, teacher_dtype))
    return engine.train(model, loss.compute_loss, datasets, criterion, cfg, adapters=loss.modules)


def command(method):
    """(get_args_parser, main) of the method's train_<name>.py."""
    def get_args_parser_():
        return get_args_parser(method)

    def main_(args):
        return main(method, args)
    return get_args_parser_, main_
