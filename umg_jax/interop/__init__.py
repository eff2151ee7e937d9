"""PyTorch interop: import pretrained CLIP weights (OpenAI / open_clip / HF) and export trained
params back to open_clip and Hugging Face ``CLIPModel``.

``mapping`` holds the one name table used in both directions; ``import_torch`` / ``export_torch``
are the CLIs (``python -m umg_jax.interop.import_torch`` / ``.export_torch``). Nothing here
imports torch at module level, except ``torch_model``: the PyTorch reader of an ``--format hf``
export (``UMGTorch.from_export``; dense, box, mask and segmentation inference equal to
``umg_jax.load``), which imports no JAX and umg_jax never imports, so it can be copied into a
serving codebase.
"""
