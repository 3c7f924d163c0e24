"""Compression of networks and model folders: calibration data, the compression itself, its review and Pareto front."""
