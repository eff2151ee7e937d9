"""One module per model family behind the annotation backends; only these import torch."""
