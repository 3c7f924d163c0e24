"""Evaluate: an original model and its variants segment the same CTs; Dice, paired tests and costs are written
as a report folder whole, from an ``EvaluateRequest``."""
from __future__ import annotations

from pathlib import Path

from ..atomic import check_output_dir, path_inputs
from ..evaluation.cases import pair_scans
from ..evaluation.report import write_report
from ..evaluation.run import Candidate, evaluate
from ..evaluation.saved import save_evaluation
from ..nnunet.layout import model_inputs
from ..nnunet.model_folder import ModelFolder
from ..progress import Progress
from .requests import EvaluateRequest


def run_evaluate(request: EvaluateRequest, progress: Progress | None = None) -> Path:
    """Write the evaluation of ``request`` into ``request.out`` (refused before hours of segmentation when it
    cannot be written) and remember it for the Pareto plots; return the folder."""
    inputs = [*(entry for index, path in enumerate(request.models)
                for entry in model_inputs("variant folder" if index else "model folder", path)),
              ("image folder", Path(request.images)), *path_inputs("label folder", [request.labels])]
    check_output_dir(Path(request.out), request.overwrite, inputs)
    model = ModelFolder.open(request.models[0])
    scans = pair_scans(Path(request.images), None if request.labels is None else Path(request.labels),
                       model.num_input_channels)
    original, *variants = (Candidate(Path(path), precision=request.precision) for path in request.models)
    result = evaluate(original, variants, scans, device=request.device, runtime=request.runtime,
                      rounds=request.rounds, memory=request.memory, progress=progress)
    data = result.to_json()
    folder = write_report(data, Path(request.out), overwrite=request.overwrite, inputs=inputs,
                          title=f"{model.name}: quality against cost on {len(result.cases)} case(s)")
    save_evaluation(data)
    return folder
