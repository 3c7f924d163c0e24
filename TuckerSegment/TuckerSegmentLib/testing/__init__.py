"""Example model folders, the demo data and overlays for tests, demos and benchmarks (not used by the product)."""
