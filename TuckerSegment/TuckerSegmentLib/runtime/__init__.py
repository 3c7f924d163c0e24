"""How networks run on a device: device choice, measured latencies, the fastest exact execution of each layer."""
