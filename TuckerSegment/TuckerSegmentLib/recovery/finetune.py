"""Labelled fine-tuning of a compressed (or pruned) model folder, as the Tucker paper did: nnU-Net's own trainer
(``nnUNetTrainerNoMirroring``: its data loading, augmentation, loss, online validation, logging and final validation),
fold 0, AdamW with nnU-Net's weight decay, constant learning rate 1e-5, starting from the compressed weights.

The trainer class is constructed directly (never looked up by name: nnU-Net's lookup imports every trainer module,
which fails beside this project's CPU torch). Its network is the compressed architecture itself, built from the
folder's ``tucker.json`` and loaded from its safetensors. Deep supervision is **off**: the compressed network is
trained exactly as it runs at inference (one full-resolution output), so the lower-resolution heads, which compression
leaves dense and unused and which filter pruning does not resize, are never needed.

No pickle is written or read: nnU-Net's own checkpoints are disabled; the state to resume an interrupted run
(``resume.save_state``: weights and AdamW moments as safetensors, nnU-Net's training log and the settings as JSON,
saved after every epoch) lives in ``<OUT_DIR>.finetune-state/`` beside the output with the data preprocessed for the
model, a name the clean-up of dead runs' leftovers never matches. The output folder is written whole or not at all,
in the same safe format as ``compress``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)
from torch import nn

from ..atomic import check_output_dir, refuse_overlap
from ..nnunet.writing import write_retrained_model
from ..defaults import FINETUNE_EPOCHS, FINETUNE_ITERATIONS_PER_EPOCH, FINETUNE_LR
from ..errors import Interrupted, ModelFolderError, TuckerSegmentError
from ..nnunet.layout import model_inputs
from ..nnunet.model_folder import ModelFolder
from ..progress import Progress
from ..runtime.devices import resolve_device
from .dataset import DatasetError, check_dataset, find_dataset, prepare_dataset
from ..paths import state_folder
from .resume import load_state, remove_state, save_state

METHOD = "finetune"
RESUME = "resume"  # inside the state folder: resume.save_state's folder (replaced whole after every epoch)
TRAINING_DIR = "training"  # inside the output's fold folder: nnU-Net's log, progress.png, validation summaries


class FinetuneError(TuckerSegmentError):
    """A fine-tuning setting or input that cannot work."""


def state_dir(output: str | Path) -> Path:
    """Where a fine-tuning run writing ``output`` keeps its state until it succeeds: ``<output>.finetune-state``
    beside it (the data preprocessed with the model's plans, nnU-Net's log, and ``resume/``)."""
    return state_folder(output, METHOD)


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: the settings, its time, nnU-Net's per-epoch log and per-class validation Dice."""

    output: Path
    dataset: str
    epochs: int
    iterations_per_epoch: int
    lr: float
    seconds: float
    device: str
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    validation_dice: dict[str, dict[str, float | None]] = field(default_factory=dict)
    resumed_from_epoch: int | None = None

    def record(self) -> dict[str, Any]:
        """The ``recovery`` entry of ``tucker.json``."""
        return {"method": "finetune", "dataset": self.dataset, "epochs": self.epochs,
                "iterations_per_epoch": self.iterations_per_epoch, "lr": self.lr, "seconds": round(self.seconds, 1),
                "device": self.device, "trainer": CompressedNetworkTrainer.__name__,
                "based_on": "nnUNetTrainerNoMirroring, fold 0, AdamW, constant lr, no deep supervision",
                "train_losses": self.train_losses, "val_losses": self.val_losses,
                "validation_dice": self.validation_dice, "resumed_from_epoch": self.resumed_from_epoch}


class _ConstantLR:
    """A learning-rate 'schedule' with nnU-Net's ``step(epoch)`` interface that keeps the rate constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        self.optimizer, self.lr = optimizer, lr

    def step(self, epoch: int | None = None) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr


class CompressedNetworkTrainer(nnUNetTrainerNoMirroring):
    """nnU-Net's no-mirroring trainer training a given (compressed) network: set ``compressed_network`` (and the
    settings) before ``initialize``. Only the network, the optimiser and the pickled checkpoints differ from nnU-Net."""

    compressed_network: nn.Module | None = None
    on_epoch: Callable[[CompressedNetworkTrainer], None] | None = None
    verbose = False

    def configure(self, network: nn.Module, epochs: int, iterations_per_epoch: int, lr: float,
                  on_epoch: Callable[[CompressedNetworkTrainer], None] | None = None, verbose: bool = False) -> None:
        self.compressed_network = network
        self.enable_deep_supervision = False
        self.initial_lr = lr
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations_per_epoch
        self.num_val_iterations_per_epoch = max(1, math.ceil(iterations_per_epoch / 5))  # nnU-Net's 250 : 50
        self.disable_checkpointing = True  # nnU-Net's checkpoints are pickles; the resume state is safetensors + JSON
        self.on_epoch = on_epoch
        self.verbose = verbose

    def build_network_architecture(self, plans_manager: Any, configuration_manager: Any, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        if self.compressed_network is None:
            raise RuntimeError("CompressedNetworkTrainer.configure(network, ...) must be called before initialize")
        return self.compressed_network

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, _ConstantLR]:
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, _ConstantLR(optimizer, self.initial_lr)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled and self.enable_deep_supervision)

    def _do_i_compile(self) -> bool:
        return False

    def plot_network_architecture(self) -> None:
        """nnU-Net tries the optional ``hiddenlayer`` package here; skipped."""

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and self.verbose,
                                  add_timestamp=add_timestamp)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.on_epoch is not None:
            self.on_epoch(self)


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set nnU-Net's environment variables (folders, data-loading processes) for the duration, then restore them."""
    previous = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _export_processes(count: int) -> Iterator[None]:
    """nnU-Net's final validation exports predictions in a pool of ``default_num_processes`` (8) fresh processes;
    on a small machine that costs more than the validation itself, so it is bounded to ``count`` here."""
    previous = nnunet_trainer_module.default_num_processes
    nnunet_trainer_module.default_num_processes = max(1, min(previous, count))
    try:
        yield
    finally:
        nnunet_trainer_module.default_num_processes = previous


def _float(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return _float(value)
    return value


def _validate(trainer: CompressedNetworkTrainer, name: str, class_names: dict[int, str],
              network: nn.Module | None = None) -> dict[str, float | None]:
    """nnU-Net's own final validation (sliding window on fold 0's validation cases, exported, scored against
    ``gt_segmentations``) of the trainer's network or of ``network``; per-class Dice by class name."""
    trained = trainer.network
    if network is not None:
        trainer.network = network.to(trainer.device)
    try:
        with _export_processes(os.cpu_count() or 1):
            trainer.perform_actual_validation()
    finally:
        if network is not None:
            network.cpu()
        trainer.network = trained
    folder = Path(trainer.output_folder) / "validation"
    summary = json.loads((folder / "summary.json").read_text())
    target = folder.with_name(f"validation_{name}")
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    return {class_names.get(int(label), str(label)): _float(scores["Dice"])
            for label, scores in summary["mean"].items()}


def _resume_record(trainer: CompressedNetworkTrainer, extra: dict[str, Any]) -> dict[str, Any]:
    return {"epochs_done": trainer.current_epoch, "logging": _jsonable(trainer.logger.get_checkpoint()),
            "best_ema": _jsonable(trainer._best_ema), **extra}


def _restore(trainer: CompressedNetworkTrainer, record: dict[str, Any]) -> None:
    """Give an initialised trainer (network and AdamW already restored by ``load_state``) the log and epoch."""
    trainer.logger.load_checkpoint(record["logging"])
    trainer.current_epoch = int(record["epochs_done"])
    trainer._best_ema = record["best_ema"]


def _check_settings(epochs: Any, iterations_per_epoch: Any, lr: Any) -> None:
    for name, value in (("epochs", epochs), ("iterations per epoch", iterations_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FinetuneError(f"the number of {name} must be a whole number of at least 1, not {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1 or not math.isfinite(lr):
        raise FinetuneError(f"the learning rate must be a number in (0, 1), not {lr!r} (the paper: 1e-5)")


def _teacher(original: str | Path, model: ModelFolder) -> nn.Module:
    teacher = ModelFolder.open(original)
    if teacher.dataset_json.get("labels") != model.dataset_json.get("labels") or \
            teacher.num_input_channels != model.num_input_channels:
        raise ModelFolderError(f"the original {teacher.path} has other labels or channels than {model.path}; give the "
                               "original the compressed folder was made from")
    return teacher.load_network(teacher.folds[0] if "0" not in teacher.folds else 0)


def _write_output(model: ModelFolder, fold: str, target: Path, overwrite: bool, network: nn.Module,
                  report: FinetuneReport, training_files: list[tuple[Path, str]]) -> None:
    """The fine-tuned fold in ``compress``'s safe format, written whole or not at all, with nnU-Net's training log."""
    record = {k: v for k, v in model.tucker_record(fold).items() if k not in ("format", "format_version")}
    previous = record.pop("recovery", None)
    recovery = report.record() | {"from": {"folder": str(model.path), "weights_sha256": record.get("weights_sha256")}}
    if previous is not None:
        recovery["previous"] = previous

    def training_log(fold_dir: Path) -> None:
        (fold_dir / TRAINING_DIR).mkdir()
        for source, name in training_files:
            if source.is_file():
                shutil.copy2(source, fold_dir / TRAINING_DIR / name)
    write_retrained_model(model, fold, network, {**record, "recovery": recovery}, target, overwrite, training_log)


def finetune_model_folder(source: str | Path, dataset: str | Path, output: str | Path, epochs: int = FINETUNE_EPOCHS,
                          iterations_per_epoch: int = FINETUNE_ITERATIONS_PER_EPOCH, lr: float = FINETUNE_LR,
                          device: str = "auto", original: str | Path | None = None, overwrite: bool = False,
                          progress: Progress | None = None, data_workers: int | None = None,
                          verbose: bool = False) -> FinetuneReport:
    """Fine-tune the compressed (or pruned) fold 0 of ``source`` on the labelled nnU-Net data set ``dataset`` (a
    folder, ``Dataset123_Name`` or ``123``; raw or preprocessed, with the model's channels and labels, an extra
    ``ignore`` label allowed) and write ``output``: same plans and labels, fold_0 with ``tucker.json`` (a
    ``recovery`` record) + ``weights.safetensors`` + ``training/`` (nnU-Net's log and progress.png, validation
    summaries). ``original``: the uncompressed model, validated alongside for comparison. ``progress(fraction,
    message)`` hears of each epoch. An interrupted run with the same settings resumes from its last epoch.
    ``data_workers``: nnU-Net's data-augmentation processes (default: nnU-Net's choice; 0 runs in this process)."""
    _check_settings(epochs, iterations_per_epoch, lr)
    say = progress or (lambda fraction, message: None)
    model, fold, found, target, training_json = _inputs(source, dataset, output, original, overwrite)
    record = model.tucker_record(fold)
    teacher = _teacher(original, model) if original is not None else None
    torch_device = resolve_device(device)
    network = model.load_network(fold)

    state, saved = state_dir(target), [0]  # saved: the epochs the state on disk holds
    with _kept_on_interrupt(state, saved):
        base = _preprocessed(found, model, state, training_json, say)
        settings = {"source_weights_sha256": record.get("weights_sha256"), "dataset": str(found.path), "lr": float(lr),
                    "iterations_per_epoch": iterations_per_epoch, "fold": 0}
        resume_folder = state / RESUME
        class_names = {int(v): k for k, v in model.dataset_json["labels"].items() if isinstance(v, int)}
        plans = copy.deepcopy(model.plans)
        plans["continue_training"] = resume_folder.exists()
        workers = None if data_workers is None else str(int(data_workers))
        with _environment(nnUNet_results=str(state / "results"), nnUNet_preprocessed=str(base.parent),
                          nnUNet_n_proc_DA=workers):
            trainer = CompressedNetworkTrainer(plans, model.configuration, 0, training_json, device=torch_device)
            extra: dict[str, Any] = {"validation_dice": {}, "seconds": 0.0}
            started = time.perf_counter()
            resumed_from = None

            def after_epoch(trained: CompressedNetworkTrainer) -> None:
                seconds = extra["seconds"] + time.perf_counter() - started
                save_state(resume_folder, settings, _resume_record(trained, {**extra, "seconds": seconds}),
                           trained.network, trained.optimizer)
                saved[0] = trained.current_epoch
                log = trained.logger.get_checkpoint()
                dice = " ".join(f"{d:.3f}" for d in log["dice_per_class_or_region"][-1])
                say(trained.current_epoch / epochs,
                    f"epoch {trained.current_epoch}/{epochs}: train loss {float(log['train_losses'][-1]):.4f}, "
                    f"validation loss {float(log['val_losses'][-1]):.4f}, pseudo Dice {dice}, "
                    f"{log['epoch_end_timestamps'][-1] - log['epoch_start_timestamps'][-1]:.1f} s")

            trainer.configure(network, epochs, iterations_per_epoch, float(lr), after_epoch, verbose)
            try:
                trainer.initialize()
                found_state = load_state(resume_folder, settings, trainer.network, trainer.optimizer)
                if found_state is not None:
                    _restore(trainer, found_state.record)
                    extra = {"validation_dice": found_state.record.get("validation_dice", {}),
                             "seconds": float(found_state.record.get("seconds", 0.0))}
                    resumed_from = saved[0] = trainer.current_epoch
                    say(trainer.current_epoch / epochs, f"resuming after epoch {trainer.current_epoch} from {state}")
                _validate_before(trainer, extra["validation_dice"], class_names, teacher, say)
                say(trainer.current_epoch / epochs, f"fine-tuning on {torch_device}: {epochs} epoch(s) of "
                                                    f"{iterations_per_epoch} iteration(s), AdamW, lr {lr:g}")
                trainer.run_training()
                seconds = extra["seconds"] + time.perf_counter() - started
                say(1.0, "validating the fine-tuned network")
                extra["validation_dice"]["finetuned"] = _validate(trainer, "finetuned", class_names)
            finally:
                _stop_loaders(trainer)
    log = trainer.logger.get_checkpoint()
    report = FinetuneReport(output=target, dataset=found.name, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                            lr=float(lr), seconds=seconds, device=str(torch_device),
                            train_losses=_jsonable(log["train_losses"]), val_losses=_jsonable(log["val_losses"]),
                            validation_dice=extra["validation_dice"],
                            resumed_from_epoch=resumed_from)
    _write_output(model, fold, target, overwrite, trainer.network.cpu(), report, _training_files(trainer))
    remove_state(state)
    return report


@contextmanager
def _kept_on_interrupt(state: Path, saved: list[int]) -> Iterator[None]:
    """An interruption says what the state folder keeps to resume from (the data set prepared, ``saved[0]`` epochs)."""
    try:
        yield
    except Interrupted as stop:
        if state.exists():
            stop.kept = (f"nothing partial was written; the fine-tuning's state ({saved[0]} epoch(s) done, the data "
                         f"set prepared) is in {state}: run the same command again to resume from it")
        raise


def _preprocessed(found: Any, model: ModelFolder, state: Path, training_json: dict[str, Any],
                  say: Progress) -> Path:
    """The data set preprocessed with the model's plans into the state folder (kept for a resumed run; a state
    folder this call created goes again when preprocessing fails)."""
    created = not state.exists()
    state.mkdir(exist_ok=True)
    try:
        return prepare_dataset(found, model, state / "preprocessed", training_json, lambda m: say(0.0, m))
    except BaseException:
        if created:
            shutil.rmtree(state, ignore_errors=True)
        raise


def _validate_before(trainer: CompressedNetworkTrainer, dice: dict[str, Any], class_names: dict[int, str],
                     teacher: Any, say: Progress) -> None:
    """nnU-Net's validation of the original (when given) and of the compressed network, unless a resumed run has
    them already."""
    if teacher is not None and "original" not in dice:
        say(0.0, "validating the original (nnU-Net's validation of fold 0)")
        dice["original"] = _validate(trainer, "original", class_names, teacher)
    if "compressed" not in dice:
        say(0.0, "validating the compressed network before fine-tuning")
        dice["compressed"] = _validate(trainer, "compressed", class_names)


def _inputs(source: str | Path, dataset: str | Path, output: str | Path, original: str | Path | None,
            overwrite: bool) -> tuple[ModelFolder, str, Any, Path, dict[str, Any]]:
    """The compressed model, its fold, the data set found, the checked output folder and nnU-Net's dataset.json
    for training: everything refused before any work."""
    model = ModelFolder.open(source)
    fold = "0"
    if not model.compressed or not model.is_compressed_fold(fold):
        raise ModelFolderError(f"{model.path} has no compressed or pruned fold 0; fine-tuning starts from the output "
                               "of tuckersegment compress (fold 0)")
    found = find_dataset(dataset)
    inputs = [*model_inputs("compressed model folder", source), ("data set", found.path),
              *([] if original is None else model_inputs("original model folder", original))]
    target = check_output_dir(Path(output), overwrite, inputs)
    refuse_overlap(state_dir(target), inputs)
    return model, fold, found, target, check_dataset(found, model)


def _training_files(trainer: CompressedNetworkTrainer) -> list[tuple[Path, str]]:
    """nnU-Net's log, progress plot and validation summaries, with their names in the output's training/."""
    folder = Path(trainer.output_folder)
    files = [(p, p.name) for p in sorted(folder.glob("training_log_*.txt"))]
    files += [(folder / "progress.png", "progress.png")]
    return files + [(folder / f"validation_{n}" / "summary.json", f"validation_{n}.json")
                    for n in ("original", "compressed", "finetuned")]


def _stop_loaders(trainer: CompressedNetworkTrainer) -> None:
    """Stop nnU-Net's data-augmentation processes (run_training does on success; an error or interrupt does not)."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with suppress(OSError, RuntimeError, AttributeError):
                finish()
    trainer.dataloader_train = trainer.dataloader_val = None


__all__ = ["CompressedNetworkTrainer", "DatasetError", "FinetuneError", "FinetuneReport",
           "finetune_model_folder", "state_dir"]
