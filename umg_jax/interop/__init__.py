"""PyTorch interop: import pretrained CLIP weights (OpenAI / open_clip / HF) and export trained
params back to open_clip and Hugging Face ``CLIPModel``.

``mapping`` holds the one name table used in both directions; ``import_torch`` / ``export_torch``
are the CLIs (``python -m umg_jax.interop.import_torch`` / ``.export_torch``). Nothing here
imports torch at module level.
"""
