"""Parameter-efficient tuning: LoRA on a frozen backbone (``lora.py``)."""
