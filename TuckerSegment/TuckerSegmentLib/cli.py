"""The ``tuckersegment`` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .atomic import check_output_dir, path_inputs, refuse_existing
from .compress.folder import compress_model_folder, describe_model, prune_model_folder
from .compress.network import CompressionReport
from .compress.pruning import PruningReport
from .errors import Interrupted, PolicyError, TuckerSegmentError
from .evaluation.cases import pair_scans
from .evaluation.report import MARKDOWN_NAME, write_report
from .evaluation.run import Candidate, evaluate
from .evaluation.saved import save_evaluation
from .image.volume import IntensityWarning
from .nnunet.layout import model_inputs
from .nnunet.model_folder import ModelFolder
from .policies.base import RankPolicy
from .policies.methods import DEFAULT_METHOD, METHODS, PRUNING_METHODS, RANK_METHODS, method, policy_for
from .progress import Progress, listening
from .runtime.stage_log import StageLog
from .recovery.compress_distill import MAX_ITERATIONS, compress_and_distill, content_digest, distill_iterations
from .recovery.distill import DEFAULT_ITERATIONS, DEFAULT_LR, TRAINED, distill_model_folder
from .runtime.inference import PRECISIONS, RUNTIMES
from .segment.batch import BatchItem, segment_batch
from .segment.output import plan_outputs, write_result
from .segment.predictor import EXECUTIONS
from .tucker.network_stats import FLOP_CONVENTION, NetworkStats
from .variants.build import build_variant, weight_only
from .variants.catalogue import READY, STANDARD_VOLUME_MM, Variant, catalogue, find_variant
from .variants.choice import choose_model, usable_devices
from .variants.guard import SafeTask
from .variants.hardware import GB, DeviceInfo, detect_devices
from .variants.measure import plan_measurement
from .variants.selection import expected_time, measurement, qualifies
from .variants.totalsegmentator import tasks

TARGET_SHORTCUTS = {"target-flops": "flops", "target-params": "params", "target-latency": "latency",
                    "factor": "uniform", "keep": "energy"}
COMPRESS_METHODS = ("tucker", *(m.key for m in PRUNING_METHODS))
RANK_ONLY_OPTIONS = ("policy", "target", "target-params", "target-latency", "factor", "keep", "weight-only")


def _iterations(text: str) -> int:
    """``--distill``'s value: a whole number of distillation iterations (0: none)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of distillation iterations (0: none), not {text!r}")
    return int(text)


def _fold(text: str) -> int | str:
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"a fold is a number or 'all', not {text!r}")
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
    source = (f"activation-aware, {report.calibration_inputs} calibration patches; agreement with the original "
              f"{report.agreement:.3f}" if report.calibration_inputs else "weight-only")
    print(f"fold {fold}: {report.policy['name']} {report.policy['params']} ({source}): {len(report.plans)} layers "
          f"decomposed, {len(report.unused_layers)} unused layers kept dense")
    _print_costs(before, after, "compressed")
    if report.latency:
        timing = report.latency
        print(f"  {'time/patch':<12} {timing['original_seconds']:>10.3f} s {timing['compressed_seconds']:>10.3f} s "
              f"{timing['ratio']:>7.3f}  (target {timing['target']}, {timing['device']})")
    worst = max(report.layers, key=lambda layer: layer.rel_error)
    print(f"  largest relative weight error: {worst.rel_error:.3f} ({worst.name})")


def _print_costs(before: NetworkStats, after: NetworkStats, label: str) -> None:
    """Parameters, FLOPs and weights of the original and the ``label``ed network, with their ratios."""
    print(f"  {'':<12} {'original':>12} {label:>12} {'ratio':>7}")
    for name, a, b, fmt in (("parameters", before.params, after.params, _millions),
                            ("FLOPs/patch", before.flops, after.flops, _giga),
                            ("weights", before.weight_bytes, after.weight_bytes, _megabytes)):
        print(f"  {name:<12} {fmt(a):>12} {fmt(b):>12} {b / a:>7.3f}")


def _print_reports(args: argparse.Namespace, reports: dict[str, Any] | None, first_line: Callable[[Any], str],
                   print_fold: Callable[[str, Any], None], recovery: dict[str, Any] | None = None) -> None:
    """Each fold's report, as JSON with --json (with --distill: the written folds' records, recovery included),
    else ``first_line(first report)``, a table per fold and the distillation's line. ``reports`` is None when an
    interrupted ``--distill`` run's compressed model was reused."""
    if args.json:
        if recovery is None:
            print(json.dumps({fold: report.to_dict() for fold, report in (reports or {}).items()}, indent=1))
        else:
            written = ModelFolder.open(args.out_dir, args.configuration)
            print(json.dumps({fold: written.tucker_record(fold) for fold in written.folds}, indent=1))
        return
    if reports is None:
        print("compression: kept from an interrupted run of the same command")
    else:
        print(first_line(next(iter(reports.values()))))
        for fold, report in reports.items():
            print_fold(fold, report)
    if recovery is not None:
        _print_distilled(recovery)
    print(f"wrote {args.out_dir} ({FLOP_CONVENTION})")


def _print_distilled(record: dict[str, Any]) -> None:
    """One line on a distillation: iterations, what trained, time, held-out agreement and KL before and after."""
    agreement, kl = record["agreement"], record["kl"]
    print(f"distilled {record['iterations']} iterations ({record['trained']} parameters trained, "
          f"{record['seconds']:.0f} s on {record['device']}); held-out agreement with the original "
          f"{agreement['before']} -> {agreement['after']}, KL {kl['before']} -> {kl['after']}")


def _check_distill(args: argparse.Namespace) -> None:
    """``compress --distill N``: the options a distillation after compression can work with."""
    distill_iterations(args.distill)
    if args.weight_only:
        raise TuckerSegmentError("--distill trains on calibration CTs and --weight-only uses none; drop --weight-only "
                                 "(compression then calibrates on the CTs distillation uses) or --distill")
    if len(args.fold) != 1:
        raise TuckerSegmentError("--distill trains one fold; compress one (--fold N), or distil each compressed fold "
                                 "with tuckersegment distill --fold N")


def _write_compressed(args: argparse.Namespace, write: Callable[[Path], dict[str, Any]],
                      settings: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """OUT_DIR as ``write(folder)`` makes it, or with ``--distill N`` that model distilled N iterations from
    MODEL_DIR on the same calibration CTs (``recovery.compress_distill``); the reports and the recovery record."""
    if not args.distill:
        return write(Path(args.out_dir)), None
    say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    return compress_and_distill(write, args.model_dir, args.out_dir, args.calibration, args.distill,
                                {**settings, "configuration": args.configuration}, device=args.device,
                                fold=args.fold[0], configuration=args.configuration, overwrite=args.overwrite,
                                trust=args.trust_checkpoint, progress=None if args.quiet else _progress("distilling "),
                                say=say, inputs=path_inputs("label map", args.labels))


def _calibration_text(record: dict[str, Any]) -> str:
    """Where a compression's calibration came from, as the compress command says it."""
    if record["source"] == "sample":
        return ("the bundled sample chest CT (no --calibration given; pass --calibration with CTs like yours for "
                "ranks fitted to them)")
    if record["source"] == "user":
        return f"your {len(record['volumes'])} CT volume(s) ({', '.join(record['volumes'])})"
    return "none (--weight-only: ranks and factors from the weights alone)"


def _progress(fold_label: str):
    def report(done: int, total: int, name: str) -> None:
        print(f"{fold_label}[{done:>3}/{total}] {name}", file=sys.stderr, flush=True)
    return report


def _policy(args: argparse.Namespace) -> RankPolicy:
    """The rank policy the compress options ask for: ``--policy METHOD --target T``, or one shortcut such as
    ``--target-flops T`` (default: the FLOP budget at its default target)."""
    named = {method: value for option, method in TARGET_SHORTCUTS.items()
             if (value := getattr(args, option.replace("-", "_"))) is not None}
    methods = set(named) | ({args.policy} if args.policy else set())
    if len(methods) > 1 or (named and args.target is not None):
        raise TuckerSegmentError(f"the options name more than one compression method ({', '.join(sorted(methods))}) or "
                                 "two targets; give one: --policy METHOD --target T, or one of "
                                 f"{', '.join('--' + option for option in TARGET_SHORTCUTS)}")
    method = methods.pop() if methods else DEFAULT_METHOD
    return policy_for(method, named.get(method, args.target), device=args.device, runtime=args.runtime,
                      rank_min=args.rank_min)


def _compress(args: argparse.Namespace) -> int:
    if args.distill:
        _check_distill(args)
    if args.method != "tucker":
        return _prune(args)
    if args.labels:
        raise TuckerSegmentError("--labels is for --method prune-taylor; Tucker compression calibrates on unlabeled "
                                 "CTs (--calibration CT...)")
    policy = _policy(args)
    progress = None if args.quiet else _progress("decomposing ")

    def write(folder: Path) -> dict[str, CompressionReport]:
        return compress_model_folder(args.model_dir, folder, policy, folds=args.fold, configuration=args.configuration,
                                     trust=args.trust_checkpoint, overwrite=args.overwrite, progress=progress,
                                     calibration=args.calibration, weight_only=args.weight_only)
    with listening(_stage_log(args.quiet)):  # long stages say how far they are
        reports, recovery = _write_compressed(args, write, {"method": "tucker", "policy": policy.to_dict()})
    _print_reports(args, reports, lambda first: f"calibration: {_calibration_text(first.calibration)}", _print_report,
                   recovery)
    return 0


def _print_pruning_report(fold: str, report: PruningReport) -> None:
    kept = sum(after for _, after in report.groups.values()) / max(1, sum(before for before, _ in report.groups.values()))
    source = (f"Taylor importance from {report.calibration_inputs} labelled patches" if report.calibration_inputs
              else "ranked by the weights alone")
    print(f"fold {fold}: {report.policy['name']} to {report.target_flops:g} of the FLOPs ({source}): every layer "
          f"prunes {report.ratio:.3f} of its filters, {kept:.1%} of the channels kept in {len(report.groups)} groups "
          f"({report.trials} trials, {report.seconds:.1f} s)")
    _print_costs(report.before, report.after, "pruned")


def _prune(args: argparse.Namespace) -> int:
    """``compress --method prune-*``: filter pruning to a FLOP budget (no Tucker ranks, no time budgets)."""
    given = [option for option in RANK_ONLY_OPTIONS if getattr(args, option.replace("-", "_")) not in (None, False)]
    if given:
        raise TuckerSegmentError(f"--policy chooses Tucker ranks only: --method {args.method} takes no "
                                 f"{', '.join('--' + o for o in given)}; give its budget as --target-flops T (default 0.5)")
    if (args.device != "auto" and not args.distill) or args.runtime != "auto":
        raise TuckerSegmentError(f"--device and --runtime time latency budgets; --method {args.method} prunes to a "
                                 "FLOP budget and times nothing: leave them out (with --distill, --device is where "
                                 "distillation trains)")
    chosen = method(args.method)
    if chosen.needs_labels and not (args.calibration and args.labels):
        raise TuckerSegmentError(f"--method {args.method} needs labelled CTs: --calibration CT... --labels LABELMAP... "
                                 "(one label map per CT, in the same order)")
    progress = None if args.quiet else _progress("pruning ")
    target = chosen.default if args.target_flops is None else args.target_flops
    # prune-l1/fpgm rank filters by their weights alone: with --distill the CTs are for the distillation only
    pruning_data = args.calibration if chosen.needs_labels or not args.distill else None

    def write(folder: Path) -> dict[str, PruningReport]:
        return prune_model_folder(args.model_dir, folder, chosen.criterion, target_flops=target, folds=args.fold,
                                  configuration=args.configuration, trust=args.trust_checkpoint,
                                  overwrite=args.overwrite, calibration=pruning_data, labels=args.labels,
                                  progress=progress)
    reports, recovery = _write_compressed(args, write, {
        "method": args.method, "target_flops": target, "labels": [content_digest(p) for p in args.labels or []]})
    _print_reports(args, reports, lambda first: f"data: {first.calibration['description']}", _print_pruning_report,
                   recovery)
    return 0


def _distill(args: argparse.Namespace) -> int:
    """``distill``: train a compressed folder to reproduce its original on unlabeled CTs (no labels)."""
    calibration = list(args.calibration)
    if len(args.paths) == 1 and len(calibration) > 1:  # "--calibration CT... OUT_DIR": the list took OUT_DIR
        args.paths.append(calibration.pop())
    if len(args.paths) != 2:
        raise TuckerSegmentError("distill needs COMPRESSED_DIR and OUT_DIR: tuckersegment distill COMPRESSED_DIR "
                                 "--teacher ORIGINAL_DIR --calibration CT... OUT_DIR")
    compressed_dir, args.out_dir = args.paths
    progress = None if args.quiet else _progress("distilling ")
    record = distill_model_folder(compressed_dir, args.teacher, calibration, args.out_dir,
                                  iterations=args.iterations, lr=args.lr, temperature=args.temperature,
                                  batch_size=args.batch_size, trained=args.trained, device=args.device, fold=args.fold,
                                  overwrite=args.overwrite, trust=args.trust_checkpoint, progress=progress)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        _print_distilled(record)
        print(f"wrote {args.out_dir}")
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
    variants, devices = catalogue(), detect_devices()
    choice = choose_model(args.model, args.task, args.device, variants, devices)
    print(f"model: {choice.reason}", file=sys.stderr)
    segmenter = SafeTask(choice, variants, usable_devices(args.device, devices),
                         notify=lambda message: print(f"tuckersegment: {message}", file=sys.stderr),
                         fold=args.fold, tile_step=args.tile_step, mirroring=args.mirroring,
                         execution=args.execution, runtime=args.runtime, precision=args.precision)
    segmenter.check_subset(args.subset)  # unknown names fail before any volume is read

    def work(job: tuple[Path, Path], progress: Progress) -> tuple[Path, str]:
        source, target = job
        refuse_existing(target, args.overwrite)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            result = segmenter.segment(source, progress=None if args.quiet else progress, subset=args.subset,
                                       crop=not args.no_crop)
        for warning in caught:
            print(f"tuckersegment: warning: {warning.message}", file=sys.stderr)
        for note in result.warnings:
            print(f"tuckersegment: {note}", file=sys.stderr)
        write_result(result, target)
        return target, (f"{len(result.found())}/{len(result.segments)} structures, {result.seconds:.1f} s "
                        f"on {result.device} ({segmenter.choice.id}; {result.runtime})")

    def done(item: BatchItem[tuple[Path, Path]]) -> None:
        source, target = item.source
        if item.ok:
            print(f"{source} -> {target}: {item.message}")
        else:
            print(f"tuckersegment: error: {source}: {item.message}", file=sys.stderr)
    with listening(_stage_log(args.quiet)):  # e.g. a model's first conversion for OpenVINO is announced
        items = segment_batch(jobs, work, name=lambda job: job[0].name, progress=_segment_progress(), done=done)
    failures = sum(not item.ok for item in items)
    if failures and len(jobs) > 1:
        print(f"tuckersegment: {failures} of {len(jobs)} inputs failed; the others were written", file=sys.stderr)
    return 2 if failures else 0


def _variant_row(variant: Variant, device: DeviceInfo) -> dict[str, Any]:
    auto, quality = qualifies(variant, device)
    return {"id": variant.id, "task": variant.task,
            "policy": "original" if variant.original else variant.policy,
            "availability": variant.availability, "detail": variant.detail,
            "params": variant.params, "flops": variant.flops, "weights_bytes": variant.weights_bytes,
            "peak_memory_bytes": variant.memory_bytes("cpu")[0], "quality": variant.quality,
            "dice_loss": variant.dice_loss(), "speed": variant.speed, "measured": variant.measured,
            "distilled": variant.distilled,
            "auto_eligible": auto, "auto_quality": quality}


def _quality_cell(variant: Variant, device: DeviceInfo) -> str:
    """The variants table's quality column: what auto judges the variant by."""
    if variant.original:
        return "reference"
    found, _ = measurement(variant, device)
    loss = variant.dice_loss()
    if found is not None and variant.quality.get("structures") and loss is not None:  # reference labels decide
        return f"Dice {-100 * loss:+.1f} (meas.)"
    if found is not None:
        return f"agree {found['mean_agreement']:.3f}" if found.get("mean_agreement") is not None else "agree ?"
    if variant.measured is not None:
        return "re-measure"
    return "unmeasured" if loss is None else f"Dice {-100 * loss:+.1f} ({variant.quality['kind'][:4]}.)"


def _variants(args: argparse.Namespace) -> int:
    variants, devices = catalogue(), detect_devices()
    try:
        choice = choose_model("auto", "auto", "auto", variants, devices)
        auto = {"id": choice.id, "reason": choice.reason, "device": choice.device}
    except TuckerSegmentError as exc:
        auto = {"id": None, "reason": str(exc), "device": None}
    here = devices[0]
    if args.json:
        print(json.dumps({"variants": [_variant_row(v, here) for v in variants], "auto": auto,
                          "devices": [d.describe() for d in devices]}, indent=1))
        return 0
    print(f"devices: {'; '.join(d.describe() for d in devices)}")
    print(f"{'id':<26} {'availability':<12} {'params':>9} {'FLOPs/patch':>12} {'peak RAM':>9} {'quality':>16} "
          f"{'speed':>7} {'auto':>4}")
    for v in variants:
        peak = v.memory_bytes("cpu")[0]
        time, _ = expected_time(v, here)
        eligible = v.availability in READY and qualifies(v, here)[0]
        print(f"{v.id:<26} {v.availability:<12} {'?' if v.params is None else _millions(v.params):>9} "
              f"{'?' if v.flops is None else _giga(v.flops):>12} {'?' if peak is None else f'{peak / GB:.1f} GiB':>9} "
              f"{_quality_cell(v, here):>16} {'?' if time is None else f'{1 / time:.2f}x':>7} "
              f"{'yes' if eligible else 'no':>4}")
    print(f"peak RAM: CPU, standard volume {STANDARD_VOLUME_MM} mm; FLOPs: {FLOP_CONVENTION}; quality: agreement with "
          "the original measured on this machine (mean Dice over structures), else Dice points below the original "
          "(published or measured); speed: vs the original, measured here when built, else the catalogue's; "
          "auto: may be chosen here (measured agreement >= 0.97, every structure with >= 1000 voxels >= 0.90; "
          "the demo: held-out Dice within 1 point, no structure with >= 1000 voxels losing more than 10)")
    distilled = [f"{v.id} ({v.distilled} iterations)" for v in variants if v.distilled]
    if distilled:
        print(f"distilled after compression (label-free, from the original): {', '.join(distilled)}")
    print(f"auto: {auto['id'] or 'none'}: {auto['reason']}")
    return 0


def _build_variants(args: argparse.Namespace) -> int:
    roots = [args.ts_weights] if args.ts_weights else None
    variants = catalogue(weights_roots=roots)
    if args.variant:
        chosen = [find_variant(variants, v) for v in args.variant]
    else:  # the default-policy variants of every task whose source weights are here or can be downloaded
        candidates = [v for v in variants if not v.original and not v.bundled and not weight_only(v)
                      and (args.task is None or v.task == args.task)]
        chosen = [v for v in candidates if v.availability in ("buildable", "built")]
        if not chosen:
            raise TuckerSegmentError(f"nothing to build: {candidates[0].detail}" if candidates else "nothing to build")
        for variant in candidates:
            if variant not in chosen:
                print(f"{variant.id}: skipped, {variant.detail}")
    plan = plan_measurement(args.calibration, args.holdout or ()) if args.calibration or args.holdout else None
    device = usable_devices(args.device, detect_devices())[0]
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    failed = []
    for variant in chosen:
        if variant.original or variant.bundled:
            print(f"{variant.id}: {variant.availability} (nothing to build)")
            continue
        try:
            folder = build_variant(variant, weights_roots=roots, report=say, plan=plan, device=device,
                                   measure=not args.no_measure, distill=args.distill)
        except PolicyError as exc:  # e.g. a latency target this network cannot reach here: the others go on
            print(f"tuckersegment: error: {variant.id}: not built: {exc}", file=sys.stderr)
            failed.append(variant.id)
            continue
        built = find_variant(catalogue(weights_roots=roots), variant.id)
        ok, quality = qualifies(built, device)
        time, source = expected_time(built, device)
        speed = "" if time is None or built.measured is None else f"; {1 / time:.2f}x the original's speed ({source})"
        distilled = f"distilled {built.distilled} iterations; " if built.distilled else ""
        print(f"{variant.id}: built in {folder}; {distilled}{quality}{speed}; "
              + ("auto may choose it" if ok else "auto will not choose it"))
    return 2 if failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    inputs = [*(entry for index, path in enumerate(args.models)
                for entry in model_inputs("variant folder" if index else "model folder", path)),
              ("image folder", args.images), *path_inputs("label folder", [args.labels])]
    check_output_dir(Path(args.out), args.overwrite, inputs)  # before hours of segmentation
    model = ModelFolder.open(args.models[0])
    scans = pair_scans(args.images, args.labels, model.num_input_channels)
    say = None if args.quiet else _segment_progress()
    original, *variants = (Candidate(Path(path), precision=args.precision) for path in args.models)
    result = evaluate(original, variants, scans, device=args.device, runtime=args.runtime,
                      rounds=args.rounds, memory=not args.no_memory, progress=say)
    data = result.to_json()
    folder = write_report(data, args.out, overwrite=args.overwrite, inputs=inputs,
                          title=f"{model.name}: quality against cost on {len(result.cases)} case(s)")
    save_evaluation(data)
    print((folder / MARKDOWN_NAME).read_text())
    print(f"wrote {folder}")
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _finetune(args: argparse.Namespace) -> int:
    from .recovery.finetune import finetune_model_folder  # nnU-Net's trainer: imported only for this command

    say = None if args.quiet else (lambda fraction, message: print(f"{fraction:4.0%} {message}", file=sys.stderr,
                                                                   flush=True))
    report = finetune_model_folder(args.compressed, args.dataset, args.out, epochs=args.epochs,
                                   iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, device=args.device,
                                   original=args.original, overwrite=args.overwrite, progress=say)
    dice = report.validation_dice
    columns = [c for c in ("original", "compressed", "finetuned") if c in dice]
    print("| class | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name in dice["finetuned"]:
        cells = [dice[c].get(name) for c in columns]
        print(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    print(f"fine-tuned {report.epochs} epoch(s) × {report.iterations_per_epoch} iteration(s) on {report.device} in "
          f"{report.seconds:.0f} s (validation Dice: nnU-Net's validation of fold 0)")
    print(f"wrote {report.output}")
    return 0


def _stage_log(quiet: bool) -> StageLog:
    """Stages of a long command on stderr (announced ones and those that take more than a few seconds)."""
    return StageLog(None if quiet else lambda message: print(f"tuckersegment: {message}", file=sys.stderr, flush=True))


def _segment_progress() -> Progress:
    """Progress on stderr, once per tenth of the batch."""
    last = [-1]

    def report(fraction: float, message: str) -> None:
        decile = int(fraction * 10)
        if decile != last[0]:
            last[0] = decile
            print(f"{fraction:4.0%} {message}", file=sys.stderr, flush=True)
    return report


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line naming the problem and where to read more (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuckersegment", description="Tucker-compressed nnU-Net segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress (Tucker) or prune (filters) an nnU-Net v2 trained model "
                                                    "folder")
    compress.add_argument("model_dir", help="nnU-Net v2 trained model folder (plans.json, dataset.json, fold_N/)")
    compress.add_argument("out_dir", help="new folder for the compressed model (written atomically)")
    compress.add_argument("--method", choices=COMPRESS_METHODS, default="tucker",
                          help="tucker (default): Tucker decomposition, ranks chosen by --policy; "
                               + "; ".join(f"{m.key}: {m.label}" for m in PRUNING_METHODS)
                               + ". The pruning baselines remove whole filters (no fine-tuning) until at most "
                                 "--target-flops of the FLOPs remain (default 0.5); prune-l1 and prune-fpgm use the "
                                 "weights alone and refuse --calibration/--labels (with --distill, --calibration CTs "
                                 "are for the distillation), prune-taylor needs --calibration CTs with their --labels")
    compress.add_argument("--policy", choices=[m.key for m in METHODS], metavar="METHOD",
                          help="Tucker rank method, with --target its number: "
                               + "; ".join(f"{m.key}: {m.label}, target = {m.target or 'none'}"
                                           + (f" (default {m.default})" if m.default is not None else "")
                                           for m in RANK_METHODS) + f" (default method: {DEFAULT_METHOD})")
    compress.add_argument("--target", type=float, help="the method's target (see --policy)")
    compress.add_argument("--target-flops", type=float,
                          help="shortcut for --policy flops --target T; with a --method prune-*, its budget: the "
                               "fraction of the original FLOPs kept (default 0.5)")
    compress.add_argument("--target-params", type=float, help="shortcut for --policy params --target T")
    compress.add_argument("--target-latency", type=float,
                          help="shortcut for --policy latency --target T: fraction of the original's time per patch "
                               "to keep, measured on --device in --runtime (e.g. 0.5: twice as fast)")
    compress.add_argument("--device", default="auto",
                          help="where --target-latency is timed and --distill trains: auto (default: the device "
                               "inference would use), cpu, cuda, cuda:N or mps")
    compress.add_argument("--runtime", choices=RUNTIMES, default="auto",
                          help="what --target-latency is timed in: auto (default: the runtime segmentation uses, "
                               "OpenVINO on a CPU when installed), torch, or openvino (CPU)")
    compress.add_argument("--calibration", nargs="+", metavar="CT",
                          help="unlabeled CT volumes (NIfTI/NRRD) for activation-aware compression: factors and ranks "
                               "then minimise each layer's output error on them (recommended; default for CT models: "
                               "the bundled sample chest CT); with --method prune-taylor, the CTs its --labels belong to")
    compress.add_argument("--labels", nargs="+", metavar="LABELMAP",
                          help="--method prune-taylor: one label map (NIfTI/NRRD, values from dataset.json) per "
                               "--calibration CT, in the same order and on the same grid; the Taylor importance comes "
                               "from the cross-entropy gradients on them")
    compress.add_argument("--weight-only", action="store_true",
                          help="the paper's data-free rule: ranks and factors from the weights alone, no calibration "
                               "(worse on real networks; models not normalised as CT need this or --calibration)")
    compress.add_argument("--factor", type=float, help="shortcut for --policy uniform --target F (the paper's DF)")
    compress.add_argument("--rank-min", type=int, default=8, help="uniform: smallest rank of any factor (default 8)")
    compress.add_argument("--keep", type=float, help="shortcut for --policy energy --target K")
    compress.add_argument("--distill", type=_iterations, default=0, metavar="N",
                          help="then recover accuracy without labels: train the compressed (or pruned) network N "
                               "iterations to reproduce MODEL_DIR's output on the calibration CTs (--calibration, "
                               "default the sample CT; as tuckersegment distill) and write that to OUT_DIR "
                               f"(default 0: none; at most {MAX_ITERATIONS}; one fold; not with --weight-only). An "
                               "interrupted run resumes from OUT_DIR.distill-source/ and OUT_DIR.distill-state/")
    compress.add_argument("--fold", type=_fold, nargs="+", default=[0], help="fold(s) to compress (default 0)")
    compress.add_argument("--configuration", help="plans configuration (default: from the folder name)")
    compress.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    compress.add_argument("--trust-checkpoint", action="store_true",
                          help="fully unpickle checkpoints a weights-only load refuses (can run code from the file)")
    compress.add_argument("--json", action="store_true", help="print the full report as JSON")
    compress.add_argument("--quiet", action="store_true", help="no per-layer progress on stderr")
    compress.set_defaults(func=_compress)

    distill = commands.add_parser(
        "distill", help="recover accuracy without labels: train a compressed folder to reproduce its original on "
                        "unlabeled CTs",
        description="Label-free distillation: the compressed network learns the original's softmax on random, "
                    "augmented patches of your unlabeled CTs (nnU-Net's preprocessing and augmentation). Writes a new "
                    "compressed folder whole; the inputs are never modified. An interrupted run resumes from "
                    "OUT_DIR.distill-state/ when run again with the same inputs.")
    distill.add_argument("paths", nargs="+", metavar="COMPRESSED_DIR OUT_DIR",
                         help="the compressed or pruned model folder (tuckersegment compress), then a new folder for "
                              "the recovered model (written atomically; it may follow the --calibration list)")
    distill.add_argument("--teacher", required=True, metavar="ORIGINAL_DIR",
                         help="the original nnU-Net model folder the compressed one was made from (read only)")
    distill.add_argument("--calibration", required=True, nargs="+", metavar="CT",
                         help="unlabeled CT volumes (NIfTI/NRRD) like the ones the model will segment")
    distill.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                         help=f"training iterations (default {DEFAULT_ITERATIONS})")
    distill.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate (default {DEFAULT_LR:g})")
    distill.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    distill.add_argument("--batch-size", type=int, help="patches per iteration (default 1 on a CPU, the plans' on a GPU)")
    distill.add_argument("--trained", choices=TRAINED, default="auto",
                         help="factorised: only the Tucker factors and cores; all: every parameter; auto (default): "
                              "as measured best on the demo model (all for pruned folders)")
    distill.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N or mps")
    distill.add_argument("--fold", type=_fold, help="fold to distil (default: the first)")
    distill.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    distill.add_argument("--trust-checkpoint", action="store_true",
                         help="fully unpickle a teacher checkpoint a weights-only load refuses (can run code)")
    distill.add_argument("--json", action="store_true", help="print the recovery record as JSON")
    distill.add_argument("--quiet", action="store_true", help="no progress on stderr")
    distill.set_defaults(func=_distill)

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
                         help="variant id (tuckersegment variants), nnU-Net model folder, or auto (default): the "
                              "fastest variant that fits this machine's GPU or CPU among those whose measured agreement with the "
                              "original passes (tuckersegment variants shows them)")
    segment.add_argument("--task", default="auto", choices=("auto", *tasks(), "demo"),
                         help="task for --model auto (default: total on a GPU, fast on a CPU, when ready; else demo)")
    segment.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    segment.add_argument("--subset", nargs="+", metavar="NAME", help="keep only these structures")
    segment.add_argument("--no-crop", action="store_true",
                         help="with --subset, run the model on the whole CT instead of only where TotalSegmentator's "
                              "6 mm model (when installed) finds the structures")
    segment.add_argument("--format", choices=("seg.nrrd", "nii.gz"), default="seg.nrrd",
                         help="file format when OUTPUT is a folder (default seg.nrrd)")
    segment.add_argument("--fold", type=_fold, help="fold to use (default: the first available)")
    segment.add_argument("--tile-step", type=float, default=0.8,
                         help="sliding-window step as a fraction of the patch (default 0.8, as TotalSegmentator)")
    segment.add_argument("--mirroring", action="store_true", help="test-time mirroring (slower; off by default)")
    segment.add_argument("--execution", choices=EXECUTIONS, default="fastest",
                         help="for the torch runtime: fastest (default): each layer in its fastest exact form on "
                              "this device, timed once and cached; reference: as stored")
    segment.add_argument("--runtime", choices=RUNTIMES, default="auto",
                         help="what runs the network under nnU-Net's predictor: auto (default: OpenVINO on a CPU "
                              "when installed, PyTorch elsewhere), torch, or openvino (CPU)")
    segment.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="auto (default: f32 on the CPU, fp16 autocast on CUDA as nnU-Net does), f32, bf16 "
                              "(OpenVINO on CPUs with native bf16: faster, labels very close) or fp16")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace existing output files (without it they are reported and kept)")
    segment.add_argument("--quiet", action="store_true", help="no progress on stderr")
    segment.set_defaults(func=_segment)

    listing = commands.add_parser("variants", help="list the catalogue: availability here and what auto picks")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=_variants)

    build = commands.add_parser("build-variants", help="compress TotalSegmentator weights into the catalogue's variants",
                                description="Build compressed variants from TotalSegmentator weights found on this "
                                            "machine (or downloaded by an installed TotalSegmentator) into the user "
                                            "cache; resumable, and a variant counts only once complete.")
    build.add_argument("--ts-weights", type=Path, metavar="DIR",
                       help="nnU-Net results folder holding TotalSegmentator's Dataset29x folders "
                            "(default: TOTALSEG_WEIGHTS_PATH, TOTALSEG_HOME_DIR, ~/.totalsegmentator/nnunet/results)")
    build.add_argument("--task", choices=tuple(tasks()), help="build only this task's variants")
    build.add_argument("--variant", nargs="+", metavar="ID",
                       help="build only these variants (default: each task's default-policy variants, balanced and "
                            "fast; the paper's uniform ones only by id)")
    build.add_argument("--calibration", nargs="+", metavar="CT",
                       help="your unlabeled CT volumes (NIfTI/NRRD) to calibrate the compression on (default: the "
                            "bundled sample chest CT); without --holdout each is split into checkerboard blocks: "
                            "calibrated on half, agreement scored on the other half")
    build.add_argument("--holdout", nargs="+", metavar="CT",
                       help="CTs never used for calibration, on which agreement with the original is scored")
    build.add_argument("--device", default="auto",
                       help="where variants are measured (and latency budgets timed): auto (default: the device "
                            "segmentation uses), cpu, cuda, cuda:N or mps")
    build.add_argument("--distill", type=_iterations, metavar="N",
                       help="distil each variant N iterations from its original on what it was calibrated on "
                            "(never the --holdout CTs or the held-out blocks agreement is scored on; label-free, as "
                            "tuckersegment distill) after compressing it and before measuring it, on --device "
                            "(default: a new build is not distilled, a built variant stays as it was built; 0 "
                            "rebuilds a distilled one without)")
    build.add_argument("--no-measure", action="store_true",
                       help="build only: auto does not choose a variant until a build measures it on this machine")
    build.add_argument("--quiet", action="store_true", help="no progress on stderr")
    build.set_defaults(func=_build_variants)

    evaluation = commands.add_parser(
        "evaluate", help="compare an original model with its compressed variants on your CTs (Dice, paired tests, "
                         "costs)",
        description="Segment every image with the original and each variant (the runtime and precision segmentation "
                    "uses, timed side by side) and write JSON, Markdown and PNG plots: per-class Dice against your "
                    "labels (when given) and against the original's labels, Wilcoxon signed-rank tests per class over "
                    "cases with Holm correction, parameters, FLOPs, weights, peak memory and seconds per volume.")
    evaluation.add_argument("models", nargs="+", metavar="MODEL_DIR [VARIANT_DIR ...]",
                            help="the original nnU-Net model folder, then compressed or pruned folders made from it")
    evaluation.add_argument("--images", required=True, type=Path, metavar="DIR",
                            help="folder of CT images (nnU-Net naming case_0000.nii.gz, or any names)")
    evaluation.add_argument("--labels", type=Path, metavar="DIR",
                            help="folder of reference label maps (case.nii.gz for case_0000.nii.gz, or the image's own "
                                 "name), numbered as the model's dataset.json")
    evaluation.add_argument("--out", required=True, type=Path, metavar="DIR",
                            help="new folder for evaluation.json, evaluation.md and the plots (written whole)")
    evaluation.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    evaluation.add_argument("--runtime", choices=RUNTIMES, default="auto",
                            help="what runs the networks (default: as segmentation does)")
    evaluation.add_argument("--precision", choices=PRECISIONS, default="auto",
                            help="precision every model runs at (default: as segmentation does)")
    evaluation.add_argument("--rounds", type=int, default=1,
                            help="segmentations of each image per model for the timing (default 1; the median counts)")
    evaluation.add_argument("--no-memory", action="store_true",
                            help="skip the peak-memory measurement (one fresh process per model)")
    evaluation.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    evaluation.add_argument("--quiet", action="store_true", help="no progress on stderr")
    evaluation.set_defaults(func=_evaluate)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a compressed or pruned model on a labelled nnU-Net data set (nnU-Net's trainer)",
        description="Fine-tune fold 0 of a compressed (or pruned) model folder as the Tucker paper did: nnU-Net's "
                    "trainer without mirroring, AdamW, constant learning rate, from the compressed weights, on a "
                    "labelled data set in nnU-Net raw or preprocessed format (preprocessed again with the model's "
                    "plans). Writes a model folder in the same safe format with nnU-Net's training log and per-class "
                    "validation Dice; an interrupted run resumes when started again with the same options.")
    finetune.add_argument("compressed", type=Path, metavar="COMPRESSED_DIR",
                          help="output of tuckersegment compress (never modified)")
    finetune.add_argument("out", type=Path, metavar="OUT_DIR", help="new folder for the fine-tuned model (written whole)")
    finetune.add_argument("--dataset", required=True, metavar="NAME_OR_ID",
                          help="the labelled data set: a folder, Dataset123_Name or 123 (looked up in $nnUNet_raw, "
                               "then $nnUNet_preprocessed); the model's channels and labels, plus an optional ignore "
                               "label")
    finetune.add_argument("--epochs", type=_positive, default=50, help="epochs (default 50, as the paper)")
    finetune.add_argument("--iterations-per-epoch", type=_positive, default=250,
                          help="training iterations per epoch (default nnU-Net's 250)")
    finetune.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate (default 1e-5)")
    finetune.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N or mps")
    finetune.add_argument("--original", "--teacher", type=Path, metavar="ORIGINAL_DIR",
                          help="the original model folder, validated alongside for comparison")
    finetune.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    finetune.add_argument("--quiet", action="store_true", help="no progress on stderr")
    finetune.set_defaults(func=_finetune)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_cancel() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM cancel the run like Cancel in Slicer (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_cancel():
            return args.func(args)
    except TuckerSegmentError as exc:
        print(f"tuckersegment: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"tuckersegment: cancelled ({signal.Signals(stop.signum).name}); nothing partial was written, "
              "outputs finished before are kept", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
