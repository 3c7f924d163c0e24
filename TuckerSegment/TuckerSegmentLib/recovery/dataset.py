"""A labelled nnU-Net data set for fine-tuning: found by name, id or path (as nnU-Net finds it), checked against a
model's channels and labels, and preprocessed with the *model's* plans (nnU-Net's DefaultPreprocessor) into a
private folder laid out as nnU-Net's trainer expects (``<base>/<plans dataset name>/<data identifier>``)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TuckerSegmentError
from ..nnunet.checkpoint import check_data_pickle
from ..nnunet.layout import label_differences, read_json
from ..nnunet.model_folder import ModelFolder
from ..paths import is_plain_name

IGNORE = "ignore"
DATASET_NAME = re.compile(r"Dataset\d{3,}_[A-Za-z0-9_.+-]+")  # nnU-Net's data set folder names
MARKER = "prepared.json"
SPLITS = "splits_final.json"


class DatasetError(TuckerSegmentError):
    """The fine-tuning data set is missing, malformed or does not fit the model."""


@dataclass
class Dataset:
    """A located nnU-Net data set: ``kind`` is ``raw`` (imagesTr/labelsTr) or ``preprocessed``."""

    path: Path
    kind: str
    dataset_json: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, DatasetError, "restore the data set's file (or remove the data set and make it again)")


def _kind(folder: Path) -> str | None:
    if not (folder / "dataset.json").is_file():
        return None
    if (folder / "imagesTr").is_dir() or "dataset" in _read_json(folder / "dataset.json"):
        return "raw"
    if any(any(p.glob("*.b2nd")) or any(p.glob("*.npz")) for p in folder.iterdir() if p.is_dir()):
        return "preprocessed"
    return None


def find_dataset(name_or_path: str | Path) -> Dataset:
    """The data set a folder path, a name (``Dataset123_Name``) or an id (``123``) names; names and ids are
    looked up in ``$nnUNet_raw`` first, then ``$nnUNet_preprocessed``, as nnU-Net does."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_dir():
        kind = _kind(candidate)
        if kind is None:
            raise DatasetError(f"{candidate} is not an nnU-Net data set: expected dataset.json with imagesTr/ and "
                               "labelsTr/ (raw) or preprocessed cases")
        return Dataset(candidate.resolve(), kind, _read_json(candidate / "dataset.json"))
    if text.isdigit():
        pattern = f"Dataset{int(text):03d}_*"
    elif DATASET_NAME.fullmatch(text):  # a plain name: no wildcard ("Dataset*" took whichever came first)
        pattern = text
    else:
        raise DatasetError(f"data set {text!r} not found: give a folder, a name (Dataset123_Name) or an id (123)")
    searched = []
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        root = os.environ.get(variable)
        if not root:
            continue
        searched.append(f"${variable}={root}")
        found = [f for f in sorted(Path(root).expanduser().glob(pattern)) if f.is_dir() and _kind(f) is not None]
        if len(found) > 1:
            raise DatasetError(f"data set id {text} names several folders in ${variable}: "
                               f"{', '.join(f.name for f in found)}; give the name or the folder")
        if found:
            return Dataset(found[0].resolve(), _kind(found[0]), _read_json(found[0] / "dataset.json"))
    where = ", ".join(searched) if searched else "neither $nnUNet_raw nor $nnUNet_preprocessed is set"
    raise DatasetError(f"data set {text!r} not found ({where}); give its folder or set nnUNet_raw as for nnU-Net")


def _labels(dataset_json: dict[str, Any]) -> dict[str, Any]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise DatasetError("dataset.json has no 'labels' object")
    return labels


def _channels(dataset_json: dict[str, Any]) -> dict[str, Any]:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict):
        raise DatasetError("dataset.json has no 'channel_names' object")
    return channels


def check_dataset(dataset: Dataset, model: ModelFolder) -> dict[str, Any]:
    """Refuse a data set whose channels or labels differ from the model's (one line naming what differs); an extra
    ``ignore`` label is allowed. Returns the dataset.json the trainer uses: the model's, plus the ignore label."""
    where = dataset.path / "dataset.json"
    theirs, ours = _channels(dataset.dataset_json), _channels(model.dataset_json)
    if len(theirs) != len(ours):
        raise DatasetError(f"{where} has {len(theirs)} input channel(s) ({', '.join(map(str, theirs.values()))}), the "
                           f"model {len(ours)} ({', '.join(map(str, ours.values()))}); use a data set with the "
                           "model's channels")
    labels = dict(_labels(dataset.dataset_json))
    ignore = labels.pop(IGNORE, None)
    model_labels = _labels(model.dataset_json)
    if labels != model_labels:
        missing, extra = label_differences(model_labels, labels)
        raise DatasetError(f"{where} labels differ from the model's: missing or renumbered "
                           f"{', '.join(missing) or 'none'}; not in the model {', '.join(extra) or 'none'} "
                           "(only an extra 'ignore' label is allowed)")
    values = [v for v in model_labels.values() if isinstance(v, int)]
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int) or ignore in values
                               or (values and ignore < max(values))):
        raise DatasetError(f"{where} has ignore label {ignore!r}; nnU-Net needs it to be the highest label value")
    training = dict(model.dataset_json)
    if isinstance(dataset.dataset_json.get("file_ending"), str):
        training["file_ending"] = dataset.dataset_json["file_ending"]  # nnU-Net's validation reads the labels with it
    if ignore is not None:
        training["labels"] = {**model_labels, IGNORE: ignore}
    return training


def _raw_cases(dataset: Dataset) -> dict[str, dict[str, Any]]:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    ending = dataset.dataset_json.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise DatasetError(f"{dataset.path / 'dataset.json'} has no 'file_ending' (e.g. \".nii.gz\")")
    if "dataset" not in dataset.dataset_json and not (dataset.path / "labelsTr").is_dir():
        raise DatasetError(f"{dataset.path} has no labelsTr/ folder: fine-tuning needs labels")
    _file_ending(ending, dataset)
    try:
        cases = get_filenames_of_train_images_and_targets(str(dataset.path), json.loads(json.dumps(dataset.dataset_json)))
    except (OSError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot list the cases of {dataset.path} ({type(exc).__name__}: {exc})") from exc
    if not cases:
        raise DatasetError(f"{dataset.path / 'imagesTr'} holds no case ending in {ending}; nothing to train on")
    channels = len(_channels(dataset.dataset_json))
    for name, case in cases.items():
        if not is_plain_name(name):
            raise DatasetError(f"{dataset.path} names a case {name!r}; case names become file names: use plain "
                               "names (letters, digits, _ . + -) in its dataset.json")
        if len(case["images"]) != channels:
            raise DatasetError(f"case {name} of {dataset.path} has {len(case['images'])} image file(s), dataset.json "
                               f"names {channels} channel(s) (files NAME_0000{ending} ...)")
        missing = [f for f in [*case["images"], case["label"]] if not Path(f).is_file()]
        if missing:
            raise DatasetError(f"case {name} of {dataset.path}: {missing[0]} is missing")
    return cases


def _plans_fit(dataset: Dataset, model: ModelFolder) -> str | None:
    """For a preprocessed data set: why its preprocessing differs from the model's plans (None: it is the same)."""
    cm = model.configuration_manager
    folder = dataset.path / cm.data_identifier
    if not folder.is_dir():
        return f"it has no {cm.data_identifier}/ folder (the model's configuration)"
    plans_file = dataset.path / f"{model.plans_manager.plans_name}.json"
    if not plans_file.is_file():
        return f"it has no {plans_file.name}"
    plans = _read_json(plans_file)
    config = plans.get("configurations", {}).get(model.configuration, {})
    for key in ("spacing", "normalization_schemes", "use_mask_for_norm"):
        if config.get(key) != model.plans["configurations"][model.configuration].get(key):
            return f"its {key} {config.get(key)} differs from the model's"
    for key in ("transpose_forward", "foreground_intensity_properties_per_channel"):
        if plans.get(key) != model.plans.get(key):
            return f"its {key} differs from the model's"
    if not (dataset.path / "gt_segmentations").is_dir():
        return "it has no gt_segmentations/ folder"
    return None


def _fingerprint(dataset: Dataset, model: ModelFolder) -> str:
    digest = hashlib.sha256(json.dumps([str(dataset.path), model.plans, model.configuration, dataset.dataset_json],
                                       sort_keys=True, default=str).encode())
    for path in sorted(dataset.path.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(dataset.path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def prepare_dataset(dataset: Dataset, model: ModelFolder, base: Path, training_json: dict[str, Any],
                    say: Callable[[str], None] | None = None) -> Path:
    """Preprocess ``dataset`` with the model's plans into ``base/<plans dataset name>/`` (reused when already done
    for the same data and plans); returns that folder. Fewer than 5 cases: fold 0 trains and validates on all."""
    say = say or (lambda message: None)
    cm = model.configuration_manager
    target = base / model.plans_manager.dataset_name
    fingerprint = _fingerprint(dataset, model)
    marker = target / MARKER
    if marker.is_file() and _read_json(marker).get("fingerprint") == fingerprint:
        say(f"reusing the data preprocessed earlier in {target}")
        return target
    if target.exists():
        shutil.rmtree(target)
    (target / "gt_segmentations").mkdir(parents=True)
    data_folder = target / cm.data_identifier
    ending = _file_ending(dataset.dataset_json.get("file_ending", model.dataset_json.get("file_ending", ".nii.gz")),
                          dataset)
    if dataset.kind == "preprocessed":
        problem = _plans_fit(dataset, model)
        if problem:
            raise DatasetError(f"{dataset.path} was preprocessed with other plans ({problem}); give the raw data set "
                               "(imagesTr/labelsTr) so it is preprocessed with the model's plans")
        shutil.copytree(dataset.path / cm.data_identifier, data_folder)
        _check_case_properties(data_folder, dataset.path / cm.data_identifier)
        shutil.copytree(dataset.path / "gt_segmentations", target / "gt_segmentations", dirs_exist_ok=True)
        names = sorted(p.name.removesuffix(ending) for p in (target / "gt_segmentations").glob(f"*{ending}"))
    else:
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        cases = _raw_cases(dataset)
        data_folder.mkdir()
        preprocessor = DefaultPreprocessor(verbose=False)
        allowed = {int(v) for v in _labels(training_json).values() if isinstance(v, int)}
        for name, case in sorted(cases.items()):  # every case checked before any work
            _check_label_values(name, case["label"], allowed, model)
        for number, (name, case) in enumerate(sorted(cases.items()), start=1):
            say(f"preprocessing case {number}/{len(cases)}: {name} (the model's plans, {model.configuration})")
            try:
                preprocessor.run_case_save(str(data_folder / name), case["images"], case["label"], model.plans_manager,
                                           cm, training_json)
            except (RuntimeError, ValueError, OSError, AssertionError) as exc:
                raise DatasetError(f"cannot preprocess case {name} of {dataset.path} ({type(exc).__name__}: "
                                   f"{str(exc).strip()[:200]}); check its image and label files") from exc
            shutil.copy2(case["label"], target / "gt_segmentations" / f"{name}{ending}")
        names = sorted(cases)
    if (dataset.path / SPLITS).is_file():
        _copy_splits(dataset.path / SPLITS, target / SPLITS, names)
    if not names:
        raise DatasetError(f"{dataset.path} holds no labelled case; nothing to train on")
    if not (target / SPLITS).is_file() and len(names) < 5:
        say(f"only {len(names)} case(s): fold 0 trains and validates on all of them (nnU-Net needs 5 for its split)")
        (target / SPLITS).write_text(json.dumps([{"train": names, "val": names}]))
    fingerprint_file = model.path / "dataset_fingerprint.json"
    if fingerprint_file.is_file():
        shutil.copy2(fingerprint_file, target / "dataset_fingerprint.json")
    else:
        (target / "dataset_fingerprint.json").write_text("{}\n")
    (target / "plans.json").write_text(json.dumps(model.plans, indent=1))
    (target / "dataset.json").write_text(json.dumps(training_json, indent=1))
    marker.write_text(json.dumps({"fingerprint": fingerprint, "dataset": str(dataset.path), "cases": names}))
    return target


def _check_case_properties(copied: Path, source: Path) -> None:
    """Refuse preprocessed cases whose properties pickles (which nnU-Net's trainer unpickles fully) hold anything
    but data; checked on the private copy the trainer will read, never the data set itself."""
    for pickled in sorted(copied.rglob("*.pkl")):
        problem = check_data_pickle(pickled)
        if problem:
            raise DatasetError(f"{source / pickled.relative_to(copied)}: {problem}, and nnU-Net would unpickle it, "
                               "running any code it names; give the raw data set (imagesTr/labelsTr) instead")


def _file_ending(ending: Any, dataset: Dataset) -> str:
    """The data set's ``file_ending`` (".nii.gz"), refused unless it is a plain file suffix (it ends file names)."""
    if not isinstance(ending, str) or not ending.startswith(".") or not is_plain_name(ending[1:]):
        raise DatasetError(f"{dataset.path / 'dataset.json'} has file_ending {ending!r}, not a file suffix such as "
                           "\".nii.gz\"; fix dataset.json")
    return ending


def _copy_splits(source: Path, target: Path, names: list[str]) -> None:
    """The data set's own ``splits_final.json``, when every fold lists only cases the data set holds (its names
    become file names in nnU-Net's validation)."""
    try:
        splits = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{source} is not readable JSON ({exc}); fix or remove it") from exc
    known = set(names)
    if not isinstance(splits, list) or not splits or not all(
            isinstance(fold, dict) and set(fold) == {"train", "val"}
            and all(isinstance(part, list) and set(part) <= known for part in fold.values()) for fold in splits):
        raise DatasetError(f"{source} is not a list of folds {{\"train\": [...], \"val\": [...]}} naming only the data "
                           "set's cases; fix or remove it (without it, nnU-Net's own split is used)")
    target.write_text(json.dumps(splits))


def _check_label_values(name: str, label_file: str, allowed: set[int], model: ModelFolder) -> None:
    """Refuse a label map holding values the model's dataset.json does not name."""
    seg, _ = model.plans_manager.image_reader_writer_class().read_seg(label_file)
    values = {int(v) for v in np.unique(seg)}
    unknown = sorted(values - allowed)
    if unknown:
        raise DatasetError(f"label map {label_file} (case {name}) holds value(s) {unknown[:10]} that the model's "
                           f"dataset.json does not name (allowed {sorted(allowed)}); fix the labels or mark them ignore")
