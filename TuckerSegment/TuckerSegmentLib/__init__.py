"""TuckerSegment's engine: Tucker compression of nnU-Net v2 models, without Slicer or Qt."""
__version__ = "0.1.0"

from .compression import CompressionReport, LayerRecord, compress_network  # noqa: E402
from .decomposition import LayerPlan, TuckerConv, decompose_conv  # noqa: E402
from .errors import TuckerSegmentError  # noqa: E402
from .folder_compression import compress_model_folder, describe_model  # noqa: E402
from .model_folder import ModelFolder, load_network  # noqa: E402
from .calibration import LayerStatistics, collect_statistics  # noqa: E402
from .policies import (BudgetPolicy, EnergyPolicy, LayerInfo, RankPolicy, UniformPolicy, VBMFPolicy,  # noqa: E402
                       policy_from_dict)
from .stats import NetworkStats, network_stats  # noqa: E402

__all__ = [
    "BudgetPolicy", "CompressionReport", "EnergyPolicy", "LayerInfo", "LayerPlan", "LayerRecord", "LayerStatistics",
    "ModelFolder", "NetworkStats", "RankPolicy", "TuckerConv", "TuckerSegmentError", "UniformPolicy", "VBMFPolicy",
    "collect_statistics", "compress_model_folder", "compress_network", "decompose_conv", "describe_model",
    "load_network", "network_stats", "policy_from_dict",
]
