"""The ``tuckersegment`` command line's arguments: shared options declared once (parent parsers), one short
function per command. Defaults are the requests' (``usecases.requests``): an option left out is left out of
the request."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..defaults import MAX_TRAINING_ITERATIONS
from ..policies.methods import DEFAULT_METHOD, PRUNING_METHODS, RANK_METHODS
from ..runtime.devices import EXECUTIONS, PRECISIONS, RUNTIMES
from ..usecases.requests import (BUILD_PRECISIONS, COMPRESS_METHODS, OUTPUT_FORMATS, CompressRequest, DistillRequest,
                                 FinetuneRequest, Request, SegmentRequest, segment_tasks)
from ..variants.totalsegmentator import tasks

UNSET = argparse.SUPPRESS  # an option not given stays out of the namespace: the request's default applies
Commands = Any  # argparse's subparsers action


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line naming the problem and where to read more (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default(request: type[Request], name: str) -> Any:
    """A request field's default, for help texts."""
    return request.__dataclass_fields__[name].default


def _whole(text: str) -> int:
    """A whole number of at least 0 (e.g. ``--distill``'s iterations)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of distillation iterations (0: none), not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def fold(text: str) -> int | str:
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"a fold is a number or 'all', not {text!r}")
    return text if text == "all" else int(text)


def _parent(*options: tuple[tuple[str, ...], dict[str, Any]]) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for flags, settings in options:
        parent.add_argument(*flags, **settings)
    return parent


DEVICE = _parent((("--device",), {"default": UNSET, "help": "auto (default: the device segmentation uses: a CUDA GPU, "
                                  "then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps; where this command runs "
                                  "its networks (times latency budgets, trains distillation)"}))
RUNTIME = _parent((("--runtime",), {"choices": RUNTIMES, "default": UNSET,
                                    "help": "what runs the networks under nnU-Net's predictor: auto (default: OpenVINO "
                                            "on a CPU when installed, PyTorch elsewhere), torch, or openvino (CPU)"}))
PRECISION = _parent((("--precision",), {"choices": PRECISIONS, "default": UNSET,
                                        "help": "auto (default: on the CPU the fastest measured form of the "
                                                "chosen variant that qualifies, else f32; fp16 autocast on CUDA as "
                                                "nnU-Net does), f32, bf16 (OpenVINO on CPUs with native bf16), fp16, "
                                                "or int8 (OpenVINO on CPUs with VNNI or AMX: the variant's stored int8 "
                                                "form, else quantized once on the sample CT with label-free accuracy "
                                                "control)"}))
FOLD = _parent((("--fold",), {"type": fold, "default": UNSET, "help": "fold to use (default: the first available)"}))
QUIET = _parent((("--quiet",), {"action": "store_true", "help": "no progress on stderr"}))
OVERWRITE = _parent((("--overwrite",), {"action": "store_true", "default": UNSET,
                                        "help": "replace the output if it exists (only once the new one is complete; "
                                                "without it an existing output is reported and kept)"}))
JSON = _parent((("--json",), {"action": "store_true", "help": "print the result as JSON"}))
TRUST = _parent((("--trust-checkpoint",), {"action": "store_true", "default": UNSET, "dest": "trust_checkpoint",
                                           "help": "fully unpickle checkpoints a weights-only load refuses (can run code "
                                                   "from the file)"}))
CALIBRATION = _parent((("--calibration",), {"nargs": "+", "metavar": "CT", "default": UNSET,
                                            "help": "unlabeled CT volumes (NIfTI/NRRD) like the ones the model will "
                                                    "segment (default for compression and builds: the bundled sample "
                                                    "chest CT)"}))


def _command(commands: Commands, name: str, run: Callable[[argparse.Namespace], int], parents: tuple = (),
             **texts: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, parents=list(parents), **texts)
    parser.set_defaults(func=run)
    return parser


def add_segment(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    segment = _command(commands, "segment", run, (DEVICE, RUNTIME, PRECISION, FOLD, OVERWRITE, QUIET),
                       help="segment CT volumes (NIfTI or NRRD) into labelled structures",
                       description="Segment one or more CT volumes. With several inputs, OUTPUT is a folder and the "
                                   "model is loaded once for all of them.")
    segment.add_argument("paths", nargs="+", metavar="INPUT... OUTPUT",
                         help="CT volume(s), then the output: .seg.nrrd (Slicer segmentation with names, colours, "
                              "terminology), .nii.gz label map, or a folder")
    segment.add_argument("--model", default=UNSET,
                         help="variant id (tuckersegment variants), nnU-Net model folder, or auto (default): the "
                              "fastest variant that fits this machine's GPU or CPU among those whose measured "
                              "agreement with the original passes (tuckersegment variants shows them)")
    segment.add_argument("--task", default=UNSET, choices=segment_tasks(),
                         help="task for --model auto (default: total on a GPU, fast on a CPU, when ready; else demo)")
    segment.add_argument("--subset", nargs="+", metavar="NAME", default=UNSET, help="keep only these structures")
    segment.add_argument("--no-crop", dest="crop", action="store_false", default=UNSET,
                         help="with --subset, run the model on the whole CT instead of only where TotalSegmentator's "
                              "6 mm model (when installed) finds the structures")
    segment.add_argument("--format", choices=OUTPUT_FORMATS, default=OUTPUT_FORMATS[0],
                         help=f"file format when OUTPUT is a folder (default {OUTPUT_FORMATS[0]})")
    segment.add_argument("--tile-step", type=float, default=UNSET,
                         help=f"sliding-window step as a fraction of the patch (default "
                              f"{default(SegmentRequest, 'tile_step')}, as TotalSegmentator)")
    segment.add_argument("--mirroring", action="store_true", default=UNSET,
                         help="test-time mirroring (slower; off by default)")
    segment.add_argument("--execution", choices=EXECUTIONS, default=UNSET,
                         help="for the torch runtime: fastest (default): each layer in its fastest exact form on "
                              "this device, timed once and cached; reference: as stored")


def add_compress(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    compress = _command(commands, "compress", run, (DEVICE, RUNTIME, CALIBRATION, OVERWRITE, TRUST, JSON, QUIET),
                        help="compress (Tucker) or prune (filters) an nnU-Net v2 trained model folder")
    compress.add_argument("model_dir", help="nnU-Net v2 trained model folder (plans.json, dataset.json, fold_N/)")
    compress.add_argument("out_dir", help="new folder for the compressed model (written atomically)")
    compress.add_argument("--method", choices=COMPRESS_METHODS, default="tucker",
                          help="tucker (default): Tucker decomposition, ranks chosen by --policy; "
                               + "; ".join(f"{m.key}: {m.label}" for m in PRUNING_METHODS)
                               + ". The pruning baselines remove whole filters (no fine-tuning) until at most "
                                 "--target-flops of the FLOPs remain (default 0.5); prune-l1 and prune-fpgm use the "
                                 "weights alone and refuse --calibration/--labels (with --distill, --calibration CTs "
                                 "are for the distillation), prune-taylor needs --calibration CTs with their --labels")
    compress.add_argument("--policy", choices=[m.key for m in RANK_METHODS + PRUNING_METHODS], metavar="METHOD",
                          help="Tucker rank method, with --target its number: "
                               + "; ".join(f"{m.key}: {m.label}, target = {m.target or 'none'}"
                                           + (f" (default {m.default})" if m.default is not None else "")
                                           for m in RANK_METHODS) + f" (default method: {DEFAULT_METHOD})")
    compress.add_argument("--target", type=float, help="the method's target (see --policy)")
    for option, text in TARGET_HELP.items():
        compress.add_argument(f"--{option}", type=float, help=text)
    compress.add_argument("--labels", nargs="+", metavar="LABELMAP", default=UNSET,
                          help="--method prune-taylor: one label map (NIfTI/NRRD, values from dataset.json) per "
                               "--calibration CT, in the same order and on the same grid; the Taylor importance comes "
                               "from the cross-entropy gradients on them")
    compress.add_argument("--weight-only", action="store_true", default=UNSET,
                          help="the paper's data-free rule: ranks and factors from the weights alone, no calibration "
                               "(worse on real networks; models not normalised as CT need this or --calibration)")
    compress.add_argument("--rank-min", type=int, default=UNSET,
                          help=f"uniform: smallest rank of any factor (default {default(CompressRequest, 'rank_min')})")
    compress.add_argument("--distill", type=_whole, default=UNSET, metavar="N",
                          help="then recover accuracy without labels: train the compressed (or pruned) network N "
                               "iterations to reproduce MODEL_DIR's output on the calibration CTs (--calibration, "
                               "default the sample CT; as tuckersegment distill) and write that to OUT_DIR "
                               f"(default 0: none; at most {MAX_TRAINING_ITERATIONS}; one fold; not with --weight-only). "
                               "An interrupted run resumes from OUT_DIR.distill-source/ and OUT_DIR.distill-state/")
    compress.add_argument("--fold", type=fold, nargs="+", dest="folds", default=UNSET,
                          help="fold(s) to compress (default 0)")
    compress.add_argument("--configuration", default=UNSET, help="plans configuration (default: from the folder name)")


TARGET_HELP = {  # the compress shortcuts: --<option> T is --policy <method> --target T
    "target-flops": "shortcut for --policy flops --target T; with a --method prune-*, its budget: the fraction of the "
                    "original FLOPs kept (default 0.5)",
    "target-params": "shortcut for --policy params --target T",
    "target-latency": "shortcut for --policy latency --target T: fraction of the original's time per patch to keep, "
                      "measured on --device in --runtime (e.g. 0.5: twice as fast)",
    "factor": "shortcut for --policy uniform --target F (the paper's DF)",
    "keep": "shortcut for --policy energy --target K",
}
TARGET_SHORTCUTS = {"target-flops": "flops", "target-params": "params", "target-latency": "latency",
                    "factor": "uniform", "keep": "energy"}


def add_distill(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    distill = _command(
        commands, "distill", run, (DEVICE, CALIBRATION, FOLD, OVERWRITE, TRUST, JSON, QUIET),
        help="recover accuracy without labels: train a compressed folder to reproduce its original on unlabeled CTs",
        description="Label-free distillation: the compressed network learns the original's softmax on random, "
                    "augmented patches of your unlabeled CTs (nnU-Net's preprocessing and augmentation). Writes a new "
                    "compressed folder whole; the inputs are never modified. An interrupted run resumes from "
                    "OUT_DIR.distill-state/ when run again with the same inputs.")
    distill.add_argument("paths", nargs="+", metavar="COMPRESSED_DIR OUT_DIR",
                         help="the compressed or pruned model folder (tuckersegment compress), then a new folder for "
                              "the recovered model (written atomically; it may follow the --calibration list)")
    distill.add_argument("--teacher", required=True, metavar="ORIGINAL_DIR",
                         help="the original nnU-Net model folder the compressed one was made from (read only)")
    distill.add_argument("--iterations", type=int, default=UNSET,
                         help=f"training iterations (default {default(DistillRequest, 'iterations')})")
    distill.add_argument("--lr", type=float, default=UNSET,
                         help=f"AdamW learning rate (default {default(DistillRequest, 'lr'):g})")
    distill.add_argument("--temperature", type=float, default=UNSET, help="softmax temperature (default 1)")
    distill.add_argument("--batch-size", type=int, default=UNSET,
                         help="patches per iteration (default 1 on a CPU, the plans' on a GPU)")
    distill.add_argument("--trained", choices=("auto", "factorised", "all"), default=UNSET,
                         help="factorised: only the Tucker factors and cores; all: every parameter; auto (default): "
                              "as measured best on the demo model (all for pruned folders)")


def add_info(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    info = _command(commands, "info", run, (JSON,), help="parameters, FLOPs and weights of a model folder")
    info.add_argument("model_dir", help="original or compressed model folder")
    info.add_argument("--fold", type=fold, help="fold to describe (default: the first)")
    info.add_argument("--configuration", help="plans configuration (default: from the folder name)")


def add_variants(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    _command(commands, "variants", run, (JSON,), help="list the catalogue: availability here and what auto picks")


def add_build(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    build = _command(commands, "build-variants", run, (DEVICE, CALIBRATION, QUIET),
                     help="compress TotalSegmentator weights into the catalogue's variants",
                     description="Build compressed variants from TotalSegmentator weights found on this machine (or "
                                 "downloaded by an installed TotalSegmentator) into the user cache; resumable, and a "
                                 "variant counts only once complete.")
    build.add_argument("--ts-weights", dest="weights", metavar="DIR", default=UNSET,
                       help="nnU-Net results folder holding TotalSegmentator's Dataset29x folders "
                            "(default: TOTALSEG_WEIGHTS_PATH, TOTALSEG_HOME_DIR, ~/.totalsegmentator/nnunet/results)")
    build.add_argument("--task", choices=tuple(tasks()), default=UNSET, help="build only this task's variants")
    build.add_argument("--variant", nargs="+", metavar="ID", dest="variants", default=UNSET,
                       help="build only these variants (default: each task's default-policy variants, balanced and "
                            "fast; the paper's uniform ones only by id)")
    build.add_argument("--holdout", nargs="+", metavar="CT", default=UNSET,
                       help="CTs never used for calibration, on which agreement with the original is scored (without "
                            "it each --calibration CT is split into checkerboard blocks: calibrated on half, agreement "
                            "scored on the other half)")
    build.add_argument("--distill", type=_whole, metavar="N", default=UNSET,
                       help="distil each variant N iterations from its original on what it was calibrated on "
                            "(never the --holdout CTs or the held-out blocks agreement is scored on; label-free, as "
                            "tuckersegment distill) after compressing it and before measuring it, on --device "
                            "(default: a new build is not distilled, a built variant stays as it was built; 0 "
                            "rebuilds a distilled one without)")
    build.add_argument("--precisions", nargs="+", choices=BUILD_PRECISIONS, default=UNSET, metavar="PRECISION",
                       help="the precisions to build and measure each variant in, for auto to choose from: f32 (always), "
                            "bf16, int8 (quantized once with label-free accuracy control, stored in the variant) "
                            "(default: every one this CPU runs natively in OpenVINO)")
    build.add_argument("--no-measure", dest="measure", action="store_false", default=UNSET,
                       help="build only: auto does not choose a variant until a build measures it on this machine")


def add_evaluate(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    evaluation = _command(
        commands, "evaluate", run, (DEVICE, RUNTIME, PRECISION, OVERWRITE, QUIET),
        help="compare an original model with its compressed variants on your CTs (Dice, paired tests, costs)",
        description="Segment every image with the original and each variant (the runtime and precision segmentation "
                    "uses, timed side by side) and write JSON, Markdown and PNG plots: per-class Dice against your "
                    "labels (when given) and against the original's labels, Wilcoxon signed-rank tests per class over "
                    "cases with Holm correction, parameters, FLOPs, weights, peak memory and seconds per volume.")
    evaluation.add_argument("models", nargs="+", metavar="MODEL_DIR [VARIANT_DIR ...]",
                            help="the original nnU-Net model folder, then compressed or pruned folders made from it")
    evaluation.add_argument("--images", required=True, metavar="DIR",
                            help="folder of CT images (nnU-Net naming case_0000.nii.gz, or any names)")
    evaluation.add_argument("--labels", metavar="DIR", default=UNSET,
                            help="folder of reference label maps (case.nii.gz for case_0000.nii.gz, or the image's own "
                                 "name), numbered as the model's dataset.json")
    evaluation.add_argument("--out", required=True, metavar="DIR",
                            help="new folder for evaluation.json, evaluation.md and the plots (written whole)")
    evaluation.add_argument("--rounds", type=int, default=UNSET,
                            help="segmentations of each image per model for the timing (default 1; the median counts)")
    evaluation.add_argument("--no-memory", dest="memory", action="store_false", default=UNSET,
                            help="skip the peak-memory measurement (one fresh process per model)")


def add_finetune(commands: Commands, run: Callable[[argparse.Namespace], int]) -> None:
    finetune = _command(
        commands, "finetune", run, (DEVICE, OVERWRITE, QUIET),
        help="fine-tune a compressed or pruned model on a labelled nnU-Net data set (nnU-Net's trainer)",
        description="Fine-tune fold 0 of a compressed (or pruned) model folder as the Tucker paper did: nnU-Net's "
                    "trainer without mirroring, AdamW, constant learning rate, from the compressed weights, on a "
                    "labelled data set in nnU-Net raw or preprocessed format (preprocessed again with the model's "
                    "plans). Writes a model folder in the same safe format with nnU-Net's training log and per-class "
                    "validation Dice; an interrupted run resumes when started again with the same options.")
    finetune.add_argument("compressed", metavar="COMPRESSED_DIR", help="output of tuckersegment compress (never modified)")
    finetune.add_argument("output", metavar="OUT_DIR", help="new folder for the fine-tuned model (written whole)")
    finetune.add_argument("--dataset", required=True, metavar="NAME_OR_ID",
                          help="the labelled data set: a folder, Dataset123_Name or 123 (looked up in $nnUNet_raw, "
                               "then $nnUNet_preprocessed); the model's channels and labels, plus an optional ignore "
                               "label")
    finetune.add_argument("--epochs", type=_positive, default=UNSET,
                          help=f"epochs (default {default(FinetuneRequest, 'epochs')}, as the paper)")
    finetune.add_argument("--iterations-per-epoch", type=_positive, default=UNSET,
                          help=f"training iterations per epoch (default nnU-Net's "
                               f"{default(FinetuneRequest, 'iterations_per_epoch')})")
    finetune.add_argument("--lr", type=float, default=UNSET,
                          help=f"constant AdamW learning rate (default {default(FinetuneRequest, 'lr'):g})")
    finetune.add_argument("--original", "--teacher", metavar="ORIGINAL_DIR", default=UNSET,
                          help="the original model folder, validated alongside for comparison")


def build_parser(runners: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The parser; ``runners`` maps each command to the function that runs its namespace."""
    parser = _Parser(prog="tuckersegment", description="Tucker-compressed nnU-Net segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, add in (("compress", add_compress), ("distill", add_distill), ("info", add_info),
                      ("segment", add_segment), ("variants", add_variants), ("build-variants", add_build),
                      ("evaluate", add_evaluate), ("finetune", add_finetune)):
        add(commands, runners[name])
    return parser


def given(args: argparse.Namespace, request: type[Request], **renamed: str) -> dict[str, Any]:
    """The request fields the command line gave (``renamed``: field -> namespace name)."""
    fields = request.__dataclass_fields__
    values = {name: getattr(args, renamed.get(name, name)) for name in fields if hasattr(args, renamed.get(name, name))}
    return {name: str(value) if isinstance(value, Path) else value for name, value in values.items()}

