"""The ``tuckersegment`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import __version__
from .compression import CompressionReport
from .devices import DEVICE_CHOICES
from .errors import TuckerSegmentError
from .folder_compression import compress_model_folder, describe_model
from .inference import Segmenter
from .label_output import plan_outputs, write_result
from .models import choose_model
from .policies import UniformPolicy
from .stats import FLOP_CONVENTION
from .volume import IntensityWarning


def _fold(text: str) -> int | str:
    return text if text == "all" else int(text)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _giga(n: int) -> str:
    return f"{n / 1e9:.1f} G"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_info(info: dict[str, Any]) -> None:
    policy = info["policy"]
    policy_text = "no (original)" if policy == "original" else f"yes: {policy['name']} {policy['params']}"
    rows = [
        ("Model folder", info["path"]),
        ("Configuration", f"{info['configuration']} (fold {info['fold']}; available: {', '.join(info['folds'])})"),
        ("Architecture", f"{info['architecture'].rsplit('.', 1)[-1]}, patch {'×'.join(map(str, info['patch_size']))}, "
                         f"{info['input_channels']} input channel(s), {info['outputs']} outputs"),
        ("Compressed", policy_text),
        ("Parameters", f"{_millions(info['params'])} (used in inference)"),
        ("FLOPs", f"{_giga(info['flops'])} per patch ({FLOP_CONVENTION})"),
        ("Weights", f"{_megabytes(info['weights_bytes'])} in memory, {_megabytes(info['file_bytes'])} on disk"),
    ]
    for label, value in rows:
        print(f"{label:<14} {value}")


def _print_report(fold: str, report: CompressionReport) -> None:
    before, after = report.before, report.after
    print(f"fold {fold}: {len(report.plans)} layers decomposed, {len(report.unused_layers)} unused layers kept dense")
    print(f"  {'':<12} {'original':>12} {'compressed':>12} {'ratio':>7}")
    for label, a, b, fmt in (("parameters", before.params, after.params, _millions),
                             ("FLOPs/patch", before.flops, after.flops, _giga),
                             ("weights", before.weight_bytes, after.weight_bytes, _megabytes)):
        print(f"  {label:<12} {fmt(a):>12} {fmt(b):>12} {b / a:>7.3f}")
    worst = max(report.layers, key=lambda layer: layer.rel_error)
    print(f"  largest relative weight error: {worst.rel_error:.3f} ({worst.name})")


def _progress(fold_label: str):
    def report(done: int, total: int, name: str) -> None:
        print(f"{fold_label}[{done:>3}/{total}] {name}", file=sys.stderr, flush=True)
    return report


def _compress(args: argparse.Namespace) -> int:
    policy = UniformPolicy(args.factor, rank_min=args.rank_min)
    progress = None if args.quiet else _progress("decomposing ")
    reports = compress_model_folder(args.model_dir, args.out_dir, policy, folds=args.fold,
                                    configuration=args.configuration, trust=args.trust_checkpoint,
                                    overwrite=args.overwrite, progress=progress)
    if args.json:
        print(json.dumps({fold: report.to_dict() for fold, report in reports.items()}, indent=1))
    else:
        for fold, report in reports.items():
            _print_report(fold, report)
        print(f"wrote {args.out_dir} ({FLOP_CONVENTION})")
    return 0


def _info(args: argparse.Namespace) -> int:
    info = describe_model(args.model_dir, fold=args.fold, configuration=args.configuration)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(info)
    return 0


def _segment(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise TuckerSegmentError("segment needs INPUT... OUTPUT: at least one CT volume and an output "
                                 "(.seg.nrrd, .nii.gz, or a folder for several inputs)")
    jobs = plan_outputs(args.paths[:-1], args.paths[-1], args.format)
    choice = choose_model(args.model)
    print(f"model: {choice.id} ({choice.reason})", file=sys.stderr)
    segmenter = Segmenter(choice.path, fold=args.fold, device=args.device, tile_step=args.tile_step,
                          mirroring=args.mirroring, name=choice.id)
    if args.subset:
        segmenter.label_value(args.subset)  # unknown names fail before any volume is read
    failures = 0
    for source, target in jobs:
        progress = None if args.quiet else _segment_progress(source.name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", IntensityWarning)
                result = segmenter.segment(source, progress=progress, subset=args.subset)
            for warning in caught:
                print(f"tuckersegment: warning: {warning.message}", file=sys.stderr)
            write_result(result, target)
        except TuckerSegmentError as exc:
            failures += 1
            print(f"tuckersegment: error: {source}: {exc}", file=sys.stderr)
            continue
        found = result.found()
        print(f"{source} -> {target}: {len(found)}/{len(result.segments)} structures, {result.seconds:.1f} s "
              f"on {result.device} ({choice.id})")
    if failures and len(jobs) > 1:
        print(f"tuckersegment: {failures} of {len(jobs)} inputs failed; the others were written", file=sys.stderr)
    return 2 if failures else 0


def _segment_progress(label: str):
    last = [-1]

    def report(fraction: float, message: str) -> None:
        decile = int(fraction * 10)
        if decile != last[0]:
            last[0] = decile
            print(f"{label}: {fraction:4.0%} {message}", file=sys.stderr, flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuckersegment", description="Tucker-compressed nnU-Net segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress an nnU-Net v2 trained model folder")
    compress.add_argument("model_dir", help="nnU-Net v2 trained model folder (plans.json, dataset.json, fold_N/)")
    compress.add_argument("out_dir", help="new folder for the compressed model (written atomically)")
    compress.add_argument("--factor", type=float, required=True,
                          help="fraction of channels each factor keeps, in (0, 1] (the paper's DF)")
    compress.add_argument("--rank-min", type=int, default=8, help="smallest rank of any factor (default 8)")
    compress.add_argument("--fold", type=_fold, nargs="+", default=[0], help="fold(s) to compress (default 0)")
    compress.add_argument("--configuration", help="plans configuration (default: from the folder name)")
    compress.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    compress.add_argument("--trust-checkpoint", action="store_true",
                          help="fully unpickle checkpoints a weights-only load refuses (can run code from the file)")
    compress.add_argument("--json", action="store_true", help="print the full report as JSON")
    compress.add_argument("--quiet", action="store_true", help="no per-layer progress on stderr")
    compress.set_defaults(func=_compress)

    info = commands.add_parser("info", help="parameters, FLOPs and weights of a model folder")
    info.add_argument("model_dir", help="original or compressed model folder")
    info.add_argument("--fold", type=_fold, help="fold to describe (default: the first)")
    info.add_argument("--configuration", help="plans configuration (default: from the folder name)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    segment = commands.add_parser("segment", help="segment CT volumes (NIfTI or NRRD) into labelled structures",
                                  description="Segment one or more CT volumes. With several inputs, OUTPUT is a "
                                              "folder and the model is loaded once for all of them.")
    segment.add_argument("paths", nargs="+", metavar="INPUT... OUTPUT",
                         help="CT volume(s), then the output: .seg.nrrd (Slicer segmentation with names, colours, "
                              "terminology), .nii.gz label map, or a folder")
    segment.add_argument("--model", default="auto",
                         help="model folder, bundled model id, or auto (default: TotalSegmentator weights when "
                              "installed, else the bundled demo model)")
    segment.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="inference device (default auto)")
    segment.add_argument("--subset", nargs="+", metavar="NAME", help="keep only these structures")
    segment.add_argument("--format", choices=("seg.nrrd", "nii.gz"), default="seg.nrrd",
                         help="file format when OUTPUT is a folder (default seg.nrrd)")
    segment.add_argument("--fold", type=_fold, help="fold to use (default: the first available)")
    segment.add_argument("--tile-step", type=float, default=0.8,
                         help="sliding-window step as a fraction of the patch (default 0.8, as TotalSegmentator)")
    segment.add_argument("--mirroring", action="store_true", help="test-time mirroring (slower; off by default)")
    segment.add_argument("--quiet", action="store_true", help="no progress on stderr")
    segment.set_defaults(func=_segment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TuckerSegmentError as exc:
        print(f"tuckersegment: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
