"""Model I/O: every file a model is read from or written to.

- ``weights``: tensor-level reading and writing of local HF checkpoint directories (lazy safetensors slices).
- ``fill``: filling a materialised model's parts from their pretrained sources, each rank reading its slices.
- ``checkpoints``: whole models from a Lightning ``.ckpt``, a sharded checkpoint directory or an export.
- ``sharded``: Lightning's checkpoint reader for sharded directories in one process (resume on one rank).
- ``export``: HF-format export for serving and reloading (``salm-mtp export``).
"""
