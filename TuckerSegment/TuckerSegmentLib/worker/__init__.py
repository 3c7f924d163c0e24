"""The worker process Slicer's Logic runs long work in, its protocol and the client that drives it."""
