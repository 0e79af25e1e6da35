"""LoRA adapters: attach, save, load; the adapter registry."""
