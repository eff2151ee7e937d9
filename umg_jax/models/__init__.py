"""Flax modules of the two towers (``clip.CLIP``) and their building blocks."""
