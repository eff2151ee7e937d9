"""PyTorch interop: import pretrained CLIP weights (OpenAI / open_clip / HF) and export trained
params back to open_clip and Hugging Face ``CLIPModel``.

``mapping`` holds the one name table used in both directions; ``import_torch`` / ``export_torch``
are the CLIs (``python -m umg_jax.interop.import_torch`` / ``.export_torch``). Nothing here
imports torch at module level, except ``torch_model`` and ``torch_seg``: the PyTorch readers of
an ``--format hf`` export (``UMGTorch.from_export``: dense, box, mask and segmentation inference
equal to ``umg_jax.load``, adapters included; ``UMGTorchSegmenter.from_export``: the segmentation
head equal to ``umg_jax.load_segmenter``). They import no JAX and umg_jax never imports them, so
they can be copied into a serving codebase.
"""
