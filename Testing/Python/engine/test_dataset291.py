"""TotalSegmentator's Dataset291 architecture: the published parameter counts (Weber et al. 2024)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from TuckerSegmentLib import ModelFolder, UniformPolicy, compress_model_folder, describe_model, load_network

PUBLISHED_MILLIONS = {0.5: 9.24, 0.3: 3.69}  # ../shared/reference/README.md, 1.5 mm params


def test_original_counts(dataset291_model):
    info = describe_model(dataset291_model)
    assert info["params"] == pytest.approx(31.19e6, rel=0.001)
    assert info["flops"] == pytest.approx(957.6e9, rel=0.001)  # FlopCounterMode, 2 per multiply-add
    assert (info["patch_size"], info["outputs"]) == ([128, 128, 128], 25)
    network = ModelFolder.open(dataset291_model).build_network()
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(31.214e6, rel=0.001)  # with DS heads


def test_factor_05_via_cli_matches_the_paper(dataset291_model, tmp_path):
    out = tmp_path / "ts291_05"
    result = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(dataset291_model), str(out),
                             "--factor", "0.5", "--rank-min", "8", "--weight-only", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "info", str(out), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["params"] == pytest.approx(PUBLISHED_MILLIONS[0.5] * 1e6, rel=0.01)
    network = load_network(out)
    with torch.no_grad():
        assert network(torch.randn(1, 1, 64, 64, 64)).shape == (1, 25, 64, 64, 64)  # 5 poolings: 2³ at the bottom


def test_factor_03_matches_the_paper(dataset291_model, tmp_path):
    reports = compress_model_folder(dataset291_model, tmp_path / "ts291_03", UniformPolicy(0.3, rank_min=8),
                                    weight_only=True)  # the paper's data-free rule
    report = reports["0"]
    assert report.after.params == pytest.approx(PUBLISHED_MILLIONS[0.3] * 1e6, rel=0.01)
    assert 1 - report.after.params / report.before.params == pytest.approx(0.88, abs=0.005)  # "88 % removed"
    assert len(report.plans) == 28 and len(report.unused_layers) == 4  # 12 + 5 + 10 + 1 head; 4 DS heads
