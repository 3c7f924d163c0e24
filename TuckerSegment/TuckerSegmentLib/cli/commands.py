"""The ``tuckersegment`` commands: each parses its options into a request (``usecases.requests``), runs it
(``usecases``) and prints the outcome."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..atomic import refuse_existing
from ..compress.folder import describe_model
from ..compress.network import CompressionReport
from ..compress.pruning import PruningReport
from ..errors import CacheWarning, Interrupted, TuckerSegmentError
from ..evaluation.report import MARKDOWN_NAME
from ..image.volume import IntensityWarning
from ..interrupts import signals_cancel
from ..nnunet.model_folder import ModelFolder
from ..policies.methods import DEFAULT_METHOD, method, policy_for
from ..progress import Progress, listening
from ..runtime.hardware import GB, DeviceInfo, detect_devices, detect_machine
from ..segment.batch import BatchItem, segment_batch
from ..segment.output import plan_outputs, write_result
from ..tucker.network_stats import FLOP_CONVENTION, NetworkStats
from ..usecases.building import run_build
from ..usecases.compressing import CompressOutcome, run_compress
from ..usecases.evaluating import run_evaluate
from ..usecases.recovering import run_distill, run_finetune
from ..usecases.requests import (BuildRequest, CompressRequest, DistillRequest, EvaluateRequest, FinetuneRequest,
                                 SegmentRequest)
from ..usecases.segmenting import plan_segmenter, segment_with
from ..variants.catalogue import READY, STANDARD_VOLUME_MM, Variant, catalogue, find_variant
from ..variants.choice import choose_model, usable_devices
from ..variants.forms import forms_of
from ..variants.selection import expected_time, form_qualifies, form_time, measurement, qualifies
from .parser import TARGET_SHORTCUTS, build_parser, given
from .terminal import Terminal, terminal


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


def _print_reports(args: argparse.Namespace, request: CompressRequest, outcome: CompressOutcome) -> None:
    """Each fold's report, as JSON with --json (with --distill: the written folds' records, recovery included),
    else ``first_line(first report)``, a table per fold and the distillation's line. ``reports`` is None when an
    interrupted ``--distill`` run's compressed model was reused."""
    reports, recovery = outcome.reports, outcome.recovery
    if args.json:
        if recovery is None:
            print(json.dumps({fold: report.to_dict() for fold, report in (reports or {}).items()}, indent=1))
        else:
            written = ModelFolder.open(request.output, request.configuration)
            print(json.dumps({fold: written.tucker_record(fold) for fold in written.folds}, indent=1))
        return
    if reports is None:
        print("compression: kept from an interrupted run of the same command")
    else:
        first = next(iter(reports.values()))
        print(f"data: {first.calibration['description']}" if request.prunes
              else f"calibration: {_calibration_text(first.calibration)}")
        for fold, report in reports.items():
            (_print_pruning_report if request.prunes else _print_report)(fold, report)
    if recovery is not None:
        _print_distilled(recovery)
    print(f"wrote {request.output} ({FLOP_CONVENTION})")


def _print_distilled(record: dict[str, Any]) -> None:
    """One line on a distillation: iterations, what trained, time, held-out agreement and KL before and after."""
    agreement, kl = record["agreement"], record["kl"]
    print(f"distilled {record['iterations']} iterations ({record['trained']} parameters trained, "
          f"{record['seconds']:.0f} s on {record['device']}); held-out agreement with the original "
          f"{agreement['before']} -> {agreement['after']}, KL {kl['before']} -> {kl['after']}")


def _calibration_text(record: dict[str, Any]) -> str:
    """Where a compression's calibration came from, as the compress command says it."""
    if record["source"] == "sample":
        return ("the bundled sample chest CT (no --calibration given; pass --calibration with CTs like yours for "
                "ranks fitted to them)")
    if record["source"] == "user":
        return f"your {len(record['volumes'])} CT volume(s) ({', '.join(record['volumes'])})"
    return "none (--weight-only: ranks and factors from the weights alone)"


def _print_pruning_report(fold: str, report: PruningReport) -> None:
    kept = sum(after for _, after in report.groups.values()) / max(1, sum(before for before, _ in report.groups.values()))
    source = (f"Taylor importance from {report.calibration_inputs} labelled patches" if report.calibration_inputs
              else "ranked by the weights alone")
    print(f"fold {fold}: {report.policy['name']} to {report.target_flops:g} of the FLOPs ({source}): every layer "
          f"prunes {report.ratio:.3f} of its filters, {kept:.1%} of the channels kept in {len(report.groups)} groups "
          f"({report.trials} trials, {report.seconds:.1f} s)")
    _print_costs(report.before, report.after, "pruned")


def _info(args: argparse.Namespace) -> int:
    info = describe_model(args.model_dir, fold=args.fold, configuration=args.configuration)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(info)
    return 0


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
    machine = detect_machine()
    variants, devices = catalogue(), list(machine.devices)
    try:
        choice = choose_model("auto", "auto", "auto", variants, devices)
        auto = {"id": choice.id, "reason": choice.reason, "device": choice.device}
    except TuckerSegmentError as exc:
        auto = {"id": None, "reason": str(exc), "device": None}
    here = devices[0]
    if args.json:
        print(json.dumps({"variants": [_variant_row(v, here) for v in variants], "auto": auto,
                          "devices": [d.describe() for d in devices],
                          "cpu_runtime": {"openvino": machine.openvino,
                                          "cpu_capabilities": list(machine.cpu_capabilities)}}, indent=1))
        return 0
    print(f"devices: {'; '.join(d.describe() for d in devices)}")
    print(f"CPU runtime: {machine.cpu_runtime()}")
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


def compress_request(args: argparse.Namespace) -> CompressRequest:
    """The compress options as a request: ``--method tucker --policy M --target T`` or one shortcut such as
    ``--target-flops T`` names the rank method; ``--method prune-*`` takes its budget from ``--target-flops``."""
    named = {method: value for option, method in TARGET_SHORTCUTS.items()
             if (value := getattr(args, option.replace("-", "_"))) is not None}
    if args.method != "tucker":
        given_rank = [f"--{o}" for o, m in TARGET_SHORTCUTS.items() if m != "flops" and m in named]
        given_rank += ["--policy"] * bool(args.policy) + ["--target"] * (args.target is not None)
        if given_rank:
            raise TuckerSegmentError(f"--policy chooses Tucker ranks only: --method {args.method} takes no "
                                     f"{', '.join(given_rank)}; give its budget as --target-flops T (default 0.5)")
        return CompressRequest(**_compress_fields(args), policy=args.method, target=named.get("flops"))
    methods = set(named) | ({args.policy} if args.policy else set())
    if len(methods) > 1 or (named and args.target is not None):
        raise TuckerSegmentError(f"the options name more than one compression method ({', '.join(sorted(methods))}) or "
                                 "two targets; give one: --policy METHOD --target T, or one of "
                                 f"{', '.join('--' + option for option in TARGET_SHORTCUTS)}")
    chosen = methods.pop() if methods else DEFAULT_METHOD
    if method(chosen).prunes:  # --policy prune-l1: a pruning method is not a rank policy
        policy_for(chosen)
    return CompressRequest(**_compress_fields(args), policy=chosen, target=named.get(chosen, args.target))


def _compress_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The compress options that are request fields as they stand (the policy and target are read apart)."""
    fields = given(args, CompressRequest, source="model_dir", output="out_dir")
    return {name: value for name, value in fields.items() if name not in ("policy", "target")}


def _compress(args: argparse.Namespace) -> int:
    request = compress_request(args)
    with terminal(args.quiet) as out, listening(out.stages()):  # long stages say how far they are
        outcome = run_compress(request, layers=out.counted("pruning" if request.prunes else "decomposing"),
                               distilling=out.counted("distilling"), say=out.say)
    _print_reports(args, request, outcome)
    return 0


def distill_request(args: argparse.Namespace) -> DistillRequest:
    """``distill COMPRESSED_DIR OUT_DIR``; OUT_DIR may follow the --calibration list (which then took it)."""
    paths, calibration = list(args.paths), list(getattr(args, "calibration", []))
    if len(paths) == 1 and len(calibration) > 1:
        paths.append(calibration.pop())
    if len(paths) != 2 or not calibration:
        raise TuckerSegmentError("distill needs COMPRESSED_DIR, OUT_DIR and --calibration CT...: tuckersegment "
                                 "distill COMPRESSED_DIR --teacher ORIGINAL_DIR --calibration CT... OUT_DIR")
    fields = {name: value for name, value in given(args, DistillRequest).items() if name != "calibration"}
    return DistillRequest(**fields, compressed=paths[0], output=paths[1], calibration=tuple(calibration))


def _distill(args: argparse.Namespace) -> int:
    """``distill``: train a compressed folder to reproduce its original on unlabeled CTs (no labels)."""
    request = distill_request(args)
    with terminal(args.quiet) as out:
        record = run_distill(request, progress=out.counted("distilling"))
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        _print_distilled(record)
        print(f"wrote {request.output}")
    return 0


def segment_request(args: argparse.Namespace) -> SegmentRequest:
    return SegmentRequest(**given(args, SegmentRequest))


def _segment(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise TuckerSegmentError("segment needs INPUT... OUTPUT: at least one CT volume and an output "
                                 "(.seg.nrrd, .nii.gz, or a folder for several inputs)")
    request = segment_request(args)
    jobs = plan_outputs(args.paths[:-1], args.paths[-1], args.format)
    with terminal(args.quiet) as out:
        return _segment_all(args, request, jobs, out)


def _segment_all(args: argparse.Namespace, request: SegmentRequest, jobs: list[tuple[Path, Path]],
                 out: Terminal) -> int:
    """Segment each (input, output) job with one model load; 2 when any failed."""
    plan = plan_segmenter(request, notify=lambda message: out.say(f"tuckersegment: {message}", always=True))
    print(f"model: {plan.reason}", file=sys.stderr)
    segmenter = plan.open()
    segmenter.check_subset(request.subset)  # unknown names fail before any volume is read
    overwrite = getattr(args, "overwrite", False)

    def work(job: tuple[Path, Path], progress: Progress) -> tuple[Path, str]:
        source, target = job
        refuse_existing(target, overwrite)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            result = segment_with(segmenter, request, source, progress)
        for warning in caught:
            out.say(f"tuckersegment: warning: {warning.message}", always=True)
        for note in result.warnings:
            out.say(f"tuckersegment: {note}", always=True)
        write_result(result, target)
        return target, (f"{len(result.found())}/{len(result.segments)} structures, {result.seconds:.1f} s "
                        f"on {result.device} ({plan.label}; {result.runtime})")
    with listening(out.stages()):  # e.g. a model's first conversion for OpenVINO is announced
        items = segment_batch(jobs, work, name=lambda job: job[0].name, progress=out.fraction("segmenting"),
                              done=_batch_line)
    failures = sum(not item.ok for item in items)
    if failures and len(jobs) > 1:
        print(f"tuckersegment: {failures} of {len(jobs)} inputs failed; the others were written", file=sys.stderr)
    return 2 if failures else 0


def _batch_line(item: BatchItem[tuple[Path, Path]]) -> None:
    source, target = item.source
    if item.ok:
        print(f"{source} -> {target}: {item.message}")
    else:
        print(f"tuckersegment: error: {source}: {item.message}", file=sys.stderr)


def build_request(args: argparse.Namespace) -> BuildRequest:
    return BuildRequest(**given(args, BuildRequest))


def _build_variants(args: argparse.Namespace) -> int:
    request = build_request(args)
    with terminal(args.quiet) as out, listening(out.stages()):
        return _build_all(request, out)


def _build_all(request: BuildRequest, out: Terminal) -> int:
    """Build what ``request`` names, then a line per variant: built (with its quality and speed), skipped or failed."""

    def starting(index: int, count: int, variant: Variant) -> None:
        if variant.original or variant.bundled:
            print(f"{variant.id}: {variant.availability} (nothing to build)")
    outcome = run_build(request, say=out.say, starting=starting,
                        skipping=lambda variant_id, reason: print(f"{variant_id}: skipped, {reason}"))
    for variant_id, reason in outcome.failed.items():
        print(f"tuckersegment: error: {variant_id}: not built: {reason}", file=sys.stderr)
    roots = [Path(request.weights)] if request.weights else None
    device = usable_devices(request.device, detect_devices())[0]
    for variant_id, folder in outcome.built.items():
        print(_built_line(find_variant(catalogue(weights_roots=roots), variant_id), folder, device))
    return 2 if outcome.failed else 0


def _built_line(built: Variant, folder: Path, device: DeviceInfo) -> str:
    ok, quality = qualifies(built, device)
    time, source = expected_time(built, device)
    speed = "" if time is None or built.measured is None else f"; {1 / time:.2f}x the original's speed ({source})"
    distilled = f"distilled {built.distilled} iterations; " if built.distilled else ""
    return (f"{built.id}: built in {folder}; {distilled}{quality}{speed}; "
            + ("auto may choose it" if ok else "auto will not choose it")
            + "".join(f"; in {form.precision}: {1 / form_time(form, device)[0]:.2f}x, "
                      + ("auto may choose it" if form_qualifies(form, device)[0] else "auto will not choose it")
                      for form in forms_of(built, device)[1:]))


def evaluate_request(args: argparse.Namespace) -> EvaluateRequest:
    return EvaluateRequest(**given(args, EvaluateRequest))


def _evaluate(args: argparse.Namespace) -> int:
    with terminal(args.quiet) as out:
        folder = run_evaluate(evaluate_request(args), progress=out.fraction("evaluating"))
    print((folder / MARKDOWN_NAME).read_text())
    print(f"wrote {folder}")
    return 0


def finetune_request(args: argparse.Namespace) -> FinetuneRequest:
    return FinetuneRequest(**given(args, FinetuneRequest))


def _finetune(args: argparse.Namespace) -> int:
    with terminal(args.quiet) as out:
        report = run_finetune(finetune_request(args), progress=out.fraction("fine-tuning", every_message=True))
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


RUNNERS = {"compress": _compress, "distill": _distill, "info": _info, "segment": _segment, "variants": _variants,
           "build-variants": _build_variants, "evaluate": _evaluate, "finetune": _finetune}


@contextlib.contextmanager
def _warnings_in_one_line() -> Iterator[None]:
    """The engine's own warnings (a cache not used, a volume that does not look like CT) as one
    ``tuckersegment: warning: ...`` line each; other libraries' as Python shows them."""
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *where: Any, **more: Any) -> None:
        if issubclass(category, (CacheWarning, IntensityWarning)):
            print(f"tuckersegment: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *where, **more)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(RUNNERS).parse_args(argv)
    try:
        with signals_cancel(), _warnings_in_one_line():
            return args.func(args)
    except TuckerSegmentError as exc:
        print(f"tuckersegment: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"tuckersegment: cancelled ({signal.Signals(stop.signum).name}); "
              f"{stop.kept or 'nothing partial was written, outputs finished before are kept'}", file=sys.stderr)
        return 128 + stop.signum
