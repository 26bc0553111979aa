"""Personal models: each user's choices, a LoRA adapter per user trained by DPO on them, served by one app."""
