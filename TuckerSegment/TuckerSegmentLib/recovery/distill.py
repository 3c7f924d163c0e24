"""Label-free recovery: the compressed network (student) learns to reproduce the original (teacher).

``distill_model_folder(compressed, teacher, calibration, output)`` trains a compressed (Tucker or pruned)
model folder's network on patches of unlabeled CTs and writes a new compressed folder in the same safe
format (plans, labels, ``tucker.json`` + ``weights.safetensors``), whole or not at all. The teacher is
loaded weights-only, kept in eval mode without gradients and never written.

- **Data.** Each CT is preprocessed as inference sees it (``calibration_data.network_ready_volume``:
  canonical RAS, the model spacing, the model's normalisation). Every iteration cuts patches of the model's
  patch size at random positions and augments them with nnU-Net's own image transforms
  (batchgeneratorsv2, nnU-Net's probabilities and ranges: Gaussian noise, blur, brightness, contrast,
  low-resolution simulation, gamma with and without inversion; no rotation or scaling) and mirrors them
  along the axes the model's training mirrored (``inference_allowed_mirroring_axes``: none for
  nnUNetTrainerNoMirroring models such as the demo and TotalSegmentator, whose left/right structures a
  mirror would swap). Teacher and student see the same augmented input.
- **Masks.** A ``CalibrationVolume``'s mask (e.g. the training half of ``image.holdout.holdout_mask``)
  decides which voxels are *scored*: voxels outside it have weight zero in the loss, and no patch is cut
  whose usable part is below a quarter of the patch (or half the best position's share, for masks that
  cover less everywhere). The image inside a patch is not masked: a network sees whole patches at
  inference, and blanking the unscored voxels would teach it images it never meets. So masked voxels may
  be seen as context of scored ones, but are never scored.
- **Held-out agreement.** A quarter of each volume's usable voxels (blocks of a 4×4×4 grid on the model
  grid, ``(k + j + i) % 4 == 0``) is never scored in training; ``agreement`` before and after is the
  label-free Dice agreement with the teacher (``tucker.calibration.prediction_agreement``) on those voxels,
  and ``kl`` the mean KL divergence there.
- **Loss.** KL(teacher ‖ student) of the softmax at temperature T (default 1), times T², averaged over the
  scored voxels. AdamW, constant learning rate.
- **What trains.** ``trained="factorised"``: the factors and cores of the Tucker layers only (dense
  layers, norms and the layers the policy left dense stay as compressed); ``"all"``: every parameter.
  ``"auto"`` (default) is ``DEFAULT_TRAINED`` = ``"all"`` (and ``"all"`` for pruned folders, which have no
  factorised layers). Decided on the bundled demo model (``scripts/bench_recovery.py distill
  --compare-trained``, ``docs/recovery.md``): budget policy at 30 % of the FLOPs, 60 iterations, lr 1e-4,
  batch 1, CPU, distilled on the training half of the sample CT: factorised only (74.8 k parameters) held-out
  agreement 0.950 → 0.957, held-out Dice 0.734 → 0.802; all (the same plus the dense layers and norms the
  policy kept) 0.950 → 0.958, Dice 0.734 → 0.804 (original 0.776). Within noise of each other; all is no worse,
  is the only choice for pruned folders, and lets the dense layers the budget kept adapt too.
- **Resumable.** The student, optimiser, iteration, log and random generator states are saved (no pickle,
  ``recovery.resume``) every ``log_every`` iterations and when the run is interrupted between iterations
  (SIGINT/SIGTERM as ``errors.Interrupted``, or ``cancelled``), in ``<OUT_DIR>.distill-state/`` beside the
  output; a rerun with the same inputs continues from it and finishes the same number of iterations; a
  finished run removes it. A state made for other inputs or settings is refused, naming it.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from torch import nn
from torch.nn import functional

from ..atomic import check_output_dir, path_inputs, refuse_overlap
from ..compress.calibration_data import CalibrationVolume, network_ready_volume
from ..compress.calibration_source import calibration_name
from ..nnunet.writing import write_retrained_model
from ..defaults import DISTILL_ITERATIONS, DISTILL_LR, DISTILL_TRAINED
from ..errors import Cancelled, Interrupted, ModelFolderError
from ..image.volume import Volume
from ..interrupts import held_interrupts
from ..nnunet.layout import Fold, fold_dir_name, model_inputs
from ..nnunet.model_folder import ModelFolder
from ..progress import Cancel, LayerProgress, check_cancel
from ..runtime.devices import resolve_device
from ..tucker.calibration import CalibrationPatch, prediction_agreement
from ..tucker.decomposition import TuckerConv
from ..paths import state_folder
from .resume import RecoveryError, load_state, remove_state, save_state

METHOD = "distill"
DEFAULT_TRAINED = "all"  # decided on the demo model: see the module docstring and docs/recovery.md
MIN_USABLE = 0.25  # the least share of a training patch's voxels that must be scored
VALIDATION_GRID = (4, 4, 4)  # blocks per axis on the model grid; (k + j + i) % 4 == 0 are held out
VALIDATION_PATCHES = 4  # per volume, on nnU-Net's sliding-window grid
SAVE_EVERY = 25  # iterations between saved states at most: a stopped run loses at most these
AUGMENTATION = ("gaussian noise p 0.1", "gaussian blur p 0.2", "brightness p 0.15", "contrast p 0.15",
                "low resolution p 0.25", "inverted gamma p 0.1", "gamma p 0.3",
                "mirroring along the model's allowed axes")


def nnunet_intensity_transforms() -> ComposeTransforms:
    """nnU-Net's training transforms that apply to the image alone, with its probabilities and ranges
    (``nnUNetTrainer.get_training_transforms``, without the spatial transform and mirroring)."""
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False, synchronize_axes=False,
                                              p_per_channel=0.5), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                                       ignore_axes=None, allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ])


@dataclass
class _Volume:
    """One calibration volume on the model grid: the image, the voxels training scores, the held-out ones."""

    image: np.ndarray
    train: np.ndarray
    validation: np.ndarray


def validation_blocks(shape: tuple[int, ...]) -> np.ndarray:
    """The held-out quarter of a model-grid array: blocks of ``VALIDATION_GRID`` with (k + j + i) % 4 == 0."""
    index = [np.minimum(np.arange(n) * b // n, b - 1) for n, b in zip(shape, VALIDATION_GRID, strict=True)]
    k, j, i = np.meshgrid(*index, indexing="ij")
    return (k + j + i) % 4 == 0


def _prepare(model: ModelFolder, items: Sequence[CalibrationVolume | Volume | str | Path]) -> list[_Volume]:
    volumes = []
    for number, item in enumerate(items, start=1):
        image, usable = network_ready_volume(model, item, number)
        held = validation_blocks(image.shape)
        volumes.append(_Volume(image.astype(np.float32), usable & ~held, usable & held))
    return volumes


def _positions(length: int, patch: int) -> np.ndarray:
    step = max(1, patch // 8)
    return np.unique(np.append(np.arange(0, length - patch + 1, step), length - patch))


def _window_shares(mask: np.ndarray, patch: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Candidate corners per axis and the share of each window's voxels ``mask`` marks (integral image)."""
    total = np.zeros([s + 1 for s in mask.shape], dtype=np.int64)
    total[1:, 1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
    axes = [_positions(n, p) for n, p in zip(mask.shape, patch, strict=True)]
    a, b, c = np.ix_(*axes)
    pa, pb, pc = patch
    sums = (total[a + pa, b + pb, c + pc] - total[a, b + pb, c + pc] - total[a + pa, b, c + pc]
            - total[a + pa, b + pb, c] + total[a, b, c + pc] + total[a, b + pb, c] + total[a + pa, b, c]
            - total[a, b, c])
    return axes, sums / float(np.prod(patch))


def training_corners(volumes: Sequence[_Volume], patch: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """(volume, a, b, c) corners of the windows training may cut: at least ``MIN_USABLE`` of the patch scored
    (or half the best window's share where no window reaches it)."""
    shares = [_window_shares(v.train, patch) for v in volumes]
    best = max(float(s.max()) for _, s in shares)
    if best <= 0:
        raise RecoveryError("the calibration masks leave no voxel to train on once a quarter is held out for the "
                            "agreement; mark larger regions or pass more CTs")
    floor = min(MIN_USABLE, best / 2)
    corners = []
    for index, (axes, share) in enumerate(shares):
        for a, b, c in zip(*np.nonzero(share >= floor), strict=True):
            corners.append((index, int(axes[0][a]), int(axes[1][b]), int(axes[2][c])))
    return corners


def validation_patches(volumes: Sequence[_Volume], patch: tuple[int, ...]) -> list[CalibrationPatch]:
    """Up to ``VALIDATION_PATCHES`` windows per volume on nnU-Net's sliding-window grid, each with its held-out
    voxels as mask."""
    patches = []
    for volume in volumes:
        steps = compute_steps_for_sliding_window(volume.image.shape, patch, 0.5)
        windows = [tuple(slice(s, s + p) for s, p in zip(corner, patch, strict=True))
                   for corner in ((a, b, c) for a in steps[0] for b in steps[1] for c in steps[2])]
        windows = [w for w in windows if volume.validation[w].any()]
        for index in np.linspace(0, len(windows) - 1, min(VALIDATION_PATCHES, len(windows))).round().astype(int):
            window = windows[index]
            patches.append(CalibrationPatch(torch.from_numpy(np.ascontiguousarray(volume.image[window]))[None, None],
                                            torch.from_numpy(np.ascontiguousarray(volume.validation[window]))[None, None]))
    return patches


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmax at ``temperature`` per voxel, times T², averaged with ``weight``
    ((B, *spatial), 0 = not scored)."""
    log_student = functional.log_softmax(student / temperature, dim=1)
    log_teacher = functional.log_softmax(teacher / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0) * temperature ** 2


def _held_out(student: nn.Module, teacher: nn.Module, patches: Sequence[CalibrationPatch],
              device: torch.device) -> dict[str, float | None]:
    """Agreement (label-free Dice) and mean KL divergence with the teacher on the held-out voxels."""
    if not patches:
        return {"agreement": None, "kl": None}
    moved = [CalibrationPatch(p.image.to(device), p.mask.to(device)) for p in patches]
    student.eval()
    with torch.no_grad():  # each network once per patch: both outputs side by side, split again for the agreement
        outputs = [CalibrationPatch(torch.cat([student(p.image), teacher(p.image)], 1), p.mask) for p in moved]
        classes = outputs[0].image.shape[1] // 2
        kls = [float(distillation_loss(o.image[:, :classes], o.image[:, classes:], o.mask[:, 0].float()))
               for o in outputs]
        agreement = prediction_agreement(lambda x: x[:, :classes], lambda x: x[:, classes:], outputs)
    return {"agreement": round(agreement, 4), "kl": round(float(np.mean(kls)), 6)}


def trainable_parameters(network: nn.Module, trained: str) -> list[nn.Parameter]:
    """The parameters ``trained`` names: those of the Tucker layers (``factorised``) or all of them."""
    if trained == "all":
        return [p for p in network.parameters()]
    seen: set[int] = set()
    params = []
    for module in network.modules():
        if isinstance(module, TuckerConv):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def _check_settings(iterations: int, lr: float, temperature: float, batch_size: int | None, trained: str) -> None:
    def whole(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, np.integer))

    if not whole(iterations) or iterations < 1:
        raise RecoveryError(f"the number of iterations must be a whole number of at least 1, not {iterations!r}")
    for name, value in (("learning rate", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise RecoveryError(f"the {name} must be a positive number, not {value!r}")
    if batch_size is not None and (not whole(batch_size) or batch_size < 1):
        raise RecoveryError(f"the batch size must be a whole number of at least 1, not {batch_size!r}")
    if trained not in DISTILL_TRAINED:
        raise RecoveryError(f"trained must be one of {', '.join(DISTILL_TRAINED)}, not {trained!r}")


def _open_pair(compressed: str | Path, teacher: str | Path, fold: Fold | None,
               trust: bool) -> tuple[ModelFolder, ModelFolder, str, dict[str, Any], str]:
    """The student and teacher folders, the fold, the student's record and the teacher checkpoint's sha256,
    after checking that they belong together."""
    student = ModelFolder.open(compressed)
    fold_name = str(fold) if fold is not None else student.folds[0]
    student.require_fold(fold_name)
    if not student.is_compressed_fold(fold_name):
        raise ModelFolderError(f"{student.path} fold {fold_name} is not compressed; distillation trains a compressed "
                               "or pruned folder (tuckersegment compress) to match its original")
    original = ModelFolder.open(teacher, student.configuration)
    original.require_fold(fold_name)
    if original.is_compressed_fold(fold_name):
        raise ModelFolderError(f"the teacher {original.path} is compressed; pass the original nnU-Net model folder "
                               "the compressed one was made from")
    if original.plans != student.plans or original.dataset_json.get("labels") != student.dataset_json.get("labels"):
        what = "plans.json" if original.plans != student.plans else "labels (dataset.json)"
        raise ModelFolderError(f"the teacher {original.path} has other {what} than {student.path}: it is another "
                               "model; pass the original the compressed folder was made from")
    record, teacher_sha = student.compressed_from(original, fold_name)
    return student, original, fold_name, record, teacher_sha


def _volume_digest(volumes: Sequence[_Volume]) -> str:
    digest = hashlib.sha256()
    for volume in volumes:
        for array in (volume.image, volume.train, volume.validation):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return ({"torch_rng": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))},
            {"numpy": [name, int(pos), int(has_gauss), float(gauss)]})


def _restore_rng(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    name, pos, has_gauss, gauss = record["numpy"]
    torch.set_rng_state(tensors["torch_rng"].to(torch.uint8))
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def distill_model_folder(compressed: str | Path, teacher: str | Path,
                         calibration: Sequence[CalibrationVolume | Volume | str | Path], output: str | Path,
                         iterations: int = DISTILL_ITERATIONS, lr: float = DISTILL_LR, temperature: float = 1.0,
                         batch_size: int | None = None, trained: str = "auto", device: str = "auto",
                         fold: Fold | None = None, overwrite: bool = False, trust: bool = False, seed: int = 0,
                         log_every: int | None = None, progress: LayerProgress | None = None,
                         cancelled: Cancel | None = None) -> dict[str, Any]:
    """Train the compressed folder ``compressed`` (Tucker or pruned) to reproduce its original ``teacher`` on
    patches of the unlabeled ``calibration`` CTs (files, ``Volume``s or masked ``CalibrationVolume``s) and write
    the result to ``output`` (a new compressed folder, whole or not at all; ``compressed`` and ``teacher`` are
    never modified). Returns the ``recovery`` record written to its ``tucker.json``.

    ``batch_size``: default 1 on the CPU, the plans' batch size on a GPU. ``log_every``: iterations per log entry and
    state save (default: a twentieth of the run, at most ``SAVE_EVERY``); ``progress(done, iterations, message)`` is
    called after every iteration. See the
    module docstring for the data, masks, loss, what trains and resuming."""
    _check_settings(iterations, lr, temperature, batch_size, trained)
    student_model, teacher_model, fold_name, record, teacher_sha = _open_pair(compressed, teacher, fold, trust)
    inputs = [*model_inputs("compressed model folder", compressed), *model_inputs("teacher model folder", teacher),
              *path_inputs("calibration CT", calibration)]
    target = check_output_dir(Path(output), overwrite, inputs)
    refuse_overlap(state_folder(target, METHOD), inputs)
    if not calibration:
        raise RecoveryError("distillation needs unlabeled CTs like the ones the model will segment: pass "
                            "--calibration CT... (a few volumes)")
    names = [calibration_name(item, n) for n, item in enumerate(calibration, start=1)]
    volumes = _prepare(student_model, calibration)
    patch = tuple(student_model.patch_size)
    held_out = validation_patches(volumes, patch)
    torch_device = resolve_device(device)
    batch = batch_size or (int(student_model.configuration_manager.batch_size) if torch_device.type == "cuda" else 1)
    pruned = "pruning" in record
    mode = ("all" if pruned else DEFAULT_TRAINED) if trained == "auto" else trained
    if mode == "factorised" and pruned:
        raise RecoveryError(f"{student_model.path} is pruned and has no factorised layers; train all parameters "
                            "(trained='all')")
    every = log_every or min(max(1, iterations // 20), SAVE_EVERY)

    teacher_net = _frozen(teacher_model.load_original(fold_name, trust)[0].to(torch_device).eval())
    student_net, params = _student(student_model, fold_name, mode, torch_device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    fingerprint = {
        "method": "distillation", "student": {"folder": str(student_model.path), "fold": fold_name,
                                              "weights_sha256": record.get("weights_sha256")},
        "teacher_sha256": teacher_sha, "calibration": _volume_digest(volumes), "iterations": iterations,
        "lr": lr, "temperature": temperature, "batch_size": batch, "trained": mode, "seed": seed, "log_every": every,
    }
    run = _Run(student_net, teacher_net, optimizer, volumes, training_corners(volumes, patch), patch, batch,
               [int(a) for a in (record.get("inference_allowed_mirroring_axes") or [])], torch_device, temperature,
               state_folder(target, METHOD), fingerprint)
    found = load_state(run.folder, fingerprint, student_net, optimizer)
    if found is None:
        run.state = {"iteration": 0, "log": [], "seconds": 0.0, "resumed": 0,
                     "before": _held_out(student_net, teacher_net, held_out, torch_device)}
    else:
        run.state = {**found.record, "resumed": int(found.record.get("resumed", 0)) + 1}
    _train(run, found, seed, iterations, every, progress, cancelled)
    after = _held_out(student_net, teacher_net, held_out, torch_device)
    recovery = {
        "method": "distillation",
        "teacher": {"folder": str(teacher_model.path),
                    "checkpoint": f"{fold_dir_name(fold_name)}/{teacher_model.checkpoint_path(fold_name).name}",
                    "sha256": teacher_sha},
        "student": {"folder": str(student_model.path), "weights_sha256": record.get("weights_sha256")},
        "calibration": names, "iterations": iterations, "batch_size": batch, "patch_size": list(patch),
        "lr": lr, "optimizer": "AdamW (weight decay 0, constant learning rate)", "temperature": temperature,
        "loss": "KL(teacher || student) of the softmax at the temperature, times its square, mean over scored voxels",
        "trained": mode, "trained_params": int(sum(p.numel() for p in params)), "augmentation": list(AUGMENTATION),
        "seconds": run.state["seconds"], "device": str(torch_device), "seed": seed, "resumed": run.state["resumed"],
        "log": run.state["log"],
        "agreement": {"before": run.state["before"]["agreement"], "after": after["agreement"],
                      "held_out": f"{len(held_out)} patches, the voxels of the held-out quarter (4×4×4 blocks) of "
                                  "each calibration volume's usable part, never scored in training"},
        "kl": {"before": run.state["before"]["kl"], "after": after["kl"]},
    }
    if "recovery" in record:
        recovery["previous"] = record["recovery"]
    _write(student_model, fold_name, record, student_net.cpu().eval(), recovery, target, overwrite)
    remove_state(run.folder)
    return recovery


def _frozen(network: nn.Module) -> nn.Module:
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def _student(model: ModelFolder, fold: str, mode: str, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    """The student network on ``device`` with only the parameters ``mode`` trains requiring gradients."""
    network = model.load_network(fold).to(device)
    params = trainable_parameters(network, mode)
    if not params:
        raise RecoveryError(f"{model.path} has no factorised layer to train; train all parameters (trained='all')")
    train_ids = {id(p) for p in params}
    for p in network.parameters():
        p.requires_grad_(id(p) in train_ids)
    return network, params


@dataclass
class _Run:
    """A distillation in progress: the two networks, the data it samples, and its state (saved to ``folder``)."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    volumes: list[Any]
    corners: list[tuple[int, int, int, int]]
    patch: tuple[int, ...]
    batch: int
    mirror_axes: list[int]
    device: torch.device
    temperature: float
    folder: Path
    fingerprint: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # since the last log entry
    clock: float = field(default_factory=time.perf_counter)
    augment: Any = field(default_factory=nnunet_intensity_transforms)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of augmented, randomly mirrored patches and their training weights."""
        images, weights = [], []
        for _ in range(self.batch):
            index, a, b, c = self.corners[np.random.randint(len(self.corners))]
            window = (slice(a, a + self.patch[0]), slice(b, b + self.patch[1]), slice(c, c + self.patch[2]))
            volume = self.volumes[index]
            image = self.augment(image=torch.from_numpy(volume.image[window].copy())[None])["image"]
            weight = torch.from_numpy(volume.train[window].astype(np.float32))[None]
            for axis in self.mirror_axes:
                if np.random.uniform() < 0.5:
                    image, weight = image.flip(axis + 1), weight.flip(axis + 1)
            images.append(image)
            weights.append(weight[0])
        return torch.stack(images).to(self.device), torch.stack(weights).to(self.device)

    def step(self) -> None:
        """One iteration: the student moves towards the teacher's softmax on one batch."""
        x, weight = self.sample()
        with torch.no_grad():
            target_logits = self.teacher(x)
        loss = distillation_loss(self.student(x), target_logits, weight, self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        self.state["iteration"] += 1

    def save(self) -> None:
        tensors, rng = _rng_tensors()
        self.state["rng"] = rng
        self.state["pending"] = [round(v, 6) for v in self.losses]
        self.tick()
        save_state(self.folder, self.fingerprint, self.state, self.student, self.optimizer, tensors)

    def tick(self) -> None:
        """Add the time since the last tick to the run's seconds."""
        now = time.perf_counter()
        self.state["seconds"] = round(self.state["seconds"] + now - self.clock, 3)
        self.clock = now


def _train(run: _Run, found: Any, seed: int, iterations: int, every: int, progress: LayerProgress | None,
           cancelled: Cancel | None) -> None:
    """Run the remaining iterations, saving every ``every`` (and on a cancel between iterations); NumPy's global
    random state is left as it was."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        if found is None:
            np.random.seed(seed)
            torch.manual_seed(seed)
        else:
            _restore_rng(found.tensors, run.state["rng"])
        run.clock, run.losses = time.perf_counter(), list(run.state.get("pending", []))
        consistent, saved_at = True, run.state["iteration"]
        try:
            while run.state["iteration"] < iterations:
                check_cancel(cancelled, "distillation")
                consistent = False
                with held_interrupts():  # Ctrl-C mid-iteration stops after it, so the state saved below is whole
                    run.step()
                consistent = True
                if run.state["iteration"] % every == 0 or run.state["iteration"] == iterations:
                    run.state["log"].append({"iteration": run.state["iteration"],
                                             "loss": round(float(np.mean(run.losses)), 6)})
                    run.losses = []
                    run.save()
                    saved_at = run.state["iteration"]
                if progress is not None:
                    logged = run.state["log"][-1]["loss"] if run.state["log"] else None
                    progress(run.state["iteration"], iterations, "" if logged is None else f"loss {logged:.4f}")
        except (Interrupted, Cancelled, KeyboardInterrupt) as stop:
            if consistent and run.state["iteration"] > saved_at:
                run.save()
                saved_at = run.state["iteration"]
            if isinstance(stop, Interrupted) and saved_at:
                stop.kept = (f"nothing partial was written; the distillation's state after iteration {saved_at} is in "
                             f"{run.folder}: run the same command again to resume from it")
            raise
        finally:
            np.random.set_state(numpy_state)
    run.tick()


def _write(student: ModelFolder, fold: str, record: dict[str, Any], network: nn.Module, recovery: dict[str, Any],
           target: Path, overwrite: bool) -> None:
    """The recovered folder: the student's plans and labels, its ``tucker.json`` with the new weights' sha256 and
    the ``recovery`` record, the trained weights."""
    kept = {k: v for k, v in record.items() if k not in ("format", "format_version")}
    write_retrained_model(student, fold, network, {**kept, "recovery": recovery}, target, overwrite)
