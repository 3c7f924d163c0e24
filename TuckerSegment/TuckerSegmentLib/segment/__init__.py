"""Segmentation: nnU-Net's predictor, multi-model tasks, labels and terminology, outputs, provenance, statistics, batches."""
