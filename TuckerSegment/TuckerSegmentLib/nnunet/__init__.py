"""nnU-Net v2 model folders as untrusted input: layout, checkpoints, the compressed (tucker.json) format."""
