"""Build compressed TotalSegmentator variants from the user's own weights into the user cache.

A build is resumable and never half-used: each model of a variant is compressed atomically into
``<cache>/variants/<id>/<dataset>`` (a model already there from an interrupted build is kept when its
source checksum, calibration and files still match), then the variant is measured against its
original on this machine (``measure.py``), and the manifest ``variant.json``, which records the sha256
of every built file, the calibration and the measurement, is written last. Without a manifest a
variant is not available.

Compression is activation-aware, calibrated on the user's CTs (or the bundled sample CT) as
``measure.plan_measurement`` splits them; the paper's uniform rule is built as published (weight-only).
A built variant whose measurement is missing, or was taken with another runtime, device or engine
version, is measured again (on the CTs recorded in its manifest) instead of rebuilt.

With ``distill`` N, each model is, after compression and before the variant is measured, trained N iterations
towards its original on the same calibration inputs (never the scored CTs or blocks), label-free
(``recovery.compress_distill``): the built folder is the distilled one, written whole; an interrupted
distillation resumes. The manifest's ``distillation`` records it; a variant built with another number of
iterations than asked is rebuilt (``None``: as it was built).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_output_file
from ..compress.folder import describe_model, model_writer
from ..compress.int8_form import build_int8_form, has_int8_form
from ..errors import ModelFolderError
from ..checksums import sealed, sha256_file
from ..nnunet.layout import TUCKER_JSON
from ..paths import is_plain_name, product_folder
from ..policies.base import RankPolicy
from ..progress import listener, listening, stage
from ..policies.methods import policy_from_dict, policy_in_words
from ..defaults import distill_iterations
from ..recovery.compress_distill import compress_and_distill
from ..runtime.stage_log import StageLog
from .catalogue import MANIFEST, Variant, read_manifest, task_of, variant_dir
from ..runtime.hardware import DeviceInfo, detect_devices
from .measure import MeasurementPlan, measure_variant, plan_measurement, replan
from .forms import cpu_forms
from .measured import changed
from .task_weights import check_task_model
from .totalsegmentator import download_task, find_task, weights_dirs

Report = Callable[[str], None]
BUILD_RECORD = "build_calibration.json"  # beside a built model: the calibration it was built with


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def source_folders(variant: Variant, weights_roots: list[Path] | None = None, download: bool = True) -> list[Path]:
    """The TotalSegmentator model folders ``variant`` is built from; downloaded with TotalSegmentator when allowed."""
    task = task_of(variant)
    if task is None:
        raise ModelFolderError(f"{variant.id} is bundled with TuckerSegment; there is nothing to build")
    found = find_task(task, weights_roots)
    if found is not None:
        return found
    if not download:
        raise ModelFolderError(f"TotalSegmentator weights for {variant.id} ({', '.join(m.dataset for m in task.models)}) "
                               f"are not in {', '.join(str(r) for r in weights_roots or weights_dirs())}; point "
                               "--ts-weights at the folder that holds them")
    return download_task(task)  # without TotalSegmentator installed, an error says where we looked and what to do


def _reusable(target: Path, source_sha256: str, calibration: dict[str, Any]) -> bool:
    """A model folder left by an interrupted build that is complete and was made from the same source
    with the same calibration."""
    try:
        record = json.loads(next(target.glob(f"fold_*/{TUCKER_JSON}")).read_text())
        built_with = json.loads((target / BUILD_RECORD).read_text())
    except (StopIteration, OSError, json.JSONDecodeError):
        return False
    if not is_plain_name(str(record.get("fold"))) or not is_plain_name(record.get("weights")):
        return False
    weights = target / f"fold_{record.get('fold')}" / record["weights"]
    return record["source"]["sha256"] == source_sha256 and built_with == calibration and \
        weights.is_file() and sha256_file(weights) == record.get("weights_sha256")


def _distilled(manifest: dict[str, Any] | None) -> int:
    """Distillation iterations a manifest's build ran (0: none)."""
    return int(((manifest or {}).get("distillation") or {}).get("iterations", 0))


def _recovery(target: Path) -> dict[str, Any]:
    """Held-out agreement with the original before and after distillation, from a built model's record."""
    record = json.loads(next(target.glob(f"fold_*/{TUCKER_JSON}")).read_text())["recovery"]
    return {"agreement": record["agreement"], "seconds": record["seconds"]}


def weight_only(variant: Variant) -> bool:
    """The paper's uniform rule is built as published: ranks and factors from the weights alone."""
    return isinstance(variant.policy, dict) and variant.policy.get("name") == "uniform"


def build_variant(variant: Variant, weights_roots: list[Path] | None = None, cache: Path | None = None,
                  report: Report | None = None, download: bool = True, plan: MeasurementPlan | None = None,
                  device: DeviceInfo | None = None, measure: bool = True, distill: int | None = None,
                  precisions: Sequence[str] | None = None) -> Path:
    """Build ``variant`` (a compressed TotalSegmentator entry) into the cache, calibrated and scored as
    ``plan`` says (default: the plan it was built with, or the bundled sample CT's blocks), distilled ``distill``
    iterations from its original on ``device`` (default: as it was built, or not), measured on ``device`` (default:
    the one ``auto`` prefers) unless ``measure`` is False, in f32 and in each of ``precisions`` (bf16, int8; default:
    each this CPU runs natively, ``forms.cpu_forms``); return its folder. Long stages are reported to ``report``
    with the time left (``runtime.stage_log``), unless the caller listens to them itself."""
    say = report or (lambda message: None)
    with nullcontext() if listener() else listening(StageLog(say)):
        return _build(variant, weights_roots, cache, say, download, plan, device, measure, distill, precisions)


def _build(variant: Variant, weights_roots: list[Path] | None, cache: Path | None, say: Report, download: bool,
           plan: MeasurementPlan | None, device: DeviceInfo | None, measure: bool, distill: int | None,
           precisions: Sequence[str] | None) -> Path:
    """``build_variant``, its stages heard by the listener in place: kept as built, measured again, or built."""
    if variant.original:
        raise ModelFolderError(f"{variant.id} is an original model: nothing to compress (its weights are used as "
                               "TotalSegmentator installed them)")
    device = device or detect_devices()[0]
    forms = cpu_forms(device, precisions)
    manifest = read_manifest(variant, cache)
    recorded = (manifest or {}).get("calibration") or {}
    distill = _distilled(manifest) if distill is None else distill_iterations(distill)
    built = (manifest is not None and (plan is None or _calibration_record(variant, plan) == recorded)
             and _distilled(manifest) == distill and set(forms) <= set((manifest or {}).get("forms", [])))
    measurement = (manifest or {}).get("measurement")
    if built and (not measure or measurement is not None and changed(measurement, device) is None
                  and set(forms) <= set(measurement.get("forms", {}))):
        say(f"{variant.id}: already built" + (" and measured" if measurement else ""))
    elif built:
        say(f"{variant.id}: built; measuring " + (f"again ({changed(measurement, device)})" if measurement else "it"))
        sources = source_folders(variant, weights_roots, download)
        _write_manifest(variant, cache, {**manifest, "measurement": _measure(
            variant, sources, manifest, plan or replan(recorded), device, cache, say, forms)})
    else:
        plan = plan or (replan(recorded) if manifest is not None else plan_measurement())
        _build_models(variant, source_folders(variant, weights_roots, download), cache, say, plan, device, measure,
                      distill, forms)
    return variant_dir(variant, cache)


def _build_models(variant: Variant, sources: list[Path], cache: Path | None, say: Report, plan: MeasurementPlan,
                  device: DeviceInfo, measure: bool, distill: int, forms: Sequence[str]) -> None:
    """Compress (and distil) every model of ``variant`` into its folder (a model an interrupted build finished is
    kept) with its int8 form when ``forms`` has it, measure the variant, and write its manifest last."""
    task = task_of(variant)
    assert task is not None
    known = variant.source.get("sha256") or {}
    folder = product_folder("built variants", "variants", variant.id, cache=cache)  # an unusable cache: one line
    (folder / MANIFEST).unlink(missing_ok=True)  # rebuilt with new calibration: not available until complete
    params = variant.policy.get("params", {})
    # a latency target is timed on the device the variant is measured on (and will run on)
    policy = policy_from_dict({**variant.policy, "params": {**params, "device": device.torch_device}}
                              if "device" in params else variant.policy)
    calibration_record = _calibration_record(variant, plan)
    built_with = {**calibration_record, "distill": distill} if distill else calibration_record
    models = []
    for index, (model, source) in enumerate(zip(task.models, sources, strict=True)):
        prefix = f"{variant.id} [{index + 1}/{len(task.models)}] {model.dataset}"
        say(f"{prefix}: checking source weights in {source}")
        with stage(model.dataset), stage("checking source weights"):
            digest = check_task_model(model, source, known.get(model.dataset), cache)
        target = folder / model.dataset
        if _reusable(target, digest, built_with):
            say(f"{prefix}: kept from an earlier, interrupted build")
        else:
            say(f"{prefix}: compressing ({policy_in_words(variant.policy)}, "
                + ("weight-only, as the paper" if weight_only(variant) else f"calibrated on {plan.calibrated_on}") + ")")
            with stage(model.dataset), stage("compressing"):
                _compress(source, target, policy, model.fold, variant, plan, distill, device, prefix, say)
            with atomic_output_file(target / BUILD_RECORD) as staging:
                staging.write_text(json.dumps(built_with))
        if "int8" in forms:
            _int8_form(target, str(model.fold), plan, prefix, say)
        models.append(_model_entry(model.dataset, source, digest, target, distill))
    manifest = {"id": variant.id, "task": variant.task, "policy": variant.policy, "tuckersegment_version": __version__,
                "calibration": calibration_record, "models": models, "forms": list(forms)}
    if distill:
        manifest["distillation"] = {"iterations": distill, "device": device.torch_device, "on": plan.calibrated_on,
                                    "how": "label-free, towards the original's softmax (tuckersegment distill)"}
    if measure:
        with stage("measuring"):
            manifest["measurement"] = _measure(variant, sources, manifest, plan, device, cache, say, forms)
    _write_manifest(variant, cache, manifest)
    say(f"{variant.id}: built in {folder}")


def _model_entry(dataset: str, source: Path, digest: str, target: Path, distill: int) -> dict[str, Any]:
    """A built model as the manifest records it: where it came from, its real costs, every file's sha256."""
    built = describe_model(target)  # the real figures of these weights' plans (the catalogue's may be assumed)
    return {"dataset": dataset, "folder": dataset, "source": str(source), "source_sha256": digest,
            "params": built["params"], "flops": built["flops"], "weights_bytes": built["weights_bytes"],
            "files": _files(target), **({"distillation": _recovery(target)} if distill else {})}


def _compress(source: Path, target: Path, policy: RankPolicy, fold: int, variant: Variant, plan: MeasurementPlan,
              distill: int, device: DeviceInfo, prefix: str, say: Report) -> None:
    """One model of a variant into ``target``: compressed, and distilled ``distill`` iterations when asked (on the
    plan's calibration inputs, whatever the compression used)."""
    compress = model_writer(source, policy, None if weight_only(variant) else plan.calibration,
                            weight_only=weight_only(variant), folds=(fold,), overwrite=True)

    def progress(done: int, total: int, message: str) -> None:
        say(f"{prefix}: distilling, iteration {done}/{total} ({message})")
    if distill:
        say(f"{prefix}: then distilling {distill} iterations on {plan.calibrated_on} ({device.torch_device})")
    compress_and_distill(compress, source, target, plan.calibration, distill,
                         {"policy": policy.to_dict(), "weight_only": weight_only(variant)},
                         device=device.torch_device, fold=fold, overwrite=True, progress=progress,
                         say=lambda message: say(f"{prefix}: {message}"))


def _int8_form(target: Path, fold: str, plan: MeasurementPlan, prefix: str, say: Report) -> None:
    """The model in ``target`` quantized to int8 on the plan's calibration inputs and stored beside it (kept when a
    valid one from an interrupted build is there)."""
    if has_int8_form(target, fold):
        say(f"{prefix}: int8 form kept from an earlier, interrupted build")
        return
    say(f"{prefix}: quantizing to int8 on {plan.calibrated_on} (label-free accuracy control)")
    with stage("quantizing to int8"):
        record = build_int8_form(target, fold, plan.calibration, plan.calibrated_on)
    say(f"{prefix}: int8 form agrees {record['agreement']} with f32 on validation patches; in float: "
        f"{', '.join(record['float_layers'])}")


def _calibration_record(variant: Variant, plan: MeasurementPlan) -> dict[str, Any]:
    return {**plan.record, "weight_only": weight_only(variant)}


def _measure(variant: Variant, sources: list[Path], manifest: dict[str, Any], plan: MeasurementPlan,
             device: DeviceInfo, cache: Path | None, say: Report, forms: Sequence[str] = ()) -> dict[str, Any]:
    """Measure the built ``variant`` against its original ``sources`` (found, never read from the manifest)."""
    task = task_of(variant)
    assert task is not None
    folder = variant_dir(variant, cache)
    measurement = measure_variant(sources,
                                  [folder / m["folder"] for m in manifest["models"]], plan.scored, device, plan.how,
                                  task.label_maps(), say=say, forms=forms)
    say(f"{variant.id}: agreement {measurement['mean_agreement']} on {plan.how}; {measurement['speedup']:.2f}x the "
        f"original's speed, {measurement['seconds']:.1f} s per volume ({measurement['context']['runtime']})")
    for precision, figures in measurement.get("forms", {}).items():
        say(f"{variant.id} in {precision}: agreement {figures['mean_agreement']}; {figures['speedup']:.2f}x the "
            f"original's speed, {figures['seconds']:.1f} s per volume ({figures['runtime']})")
    return measurement


def _write_manifest(variant: Variant, cache: Path | None, manifest: dict[str, Any]) -> None:
    with atomic_output_file(variant_dir(variant, cache) / MANIFEST) as staging:
        staging.write_text(json.dumps(sealed(manifest), indent=1))
