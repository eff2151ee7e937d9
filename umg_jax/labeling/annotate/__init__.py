"""Pseudo-annotation with teacher models (UMG-41M recipe); see ``__main__.py``. No torch here."""
