"""lora_lab: compare full fine-tuning, bottleneck adapters, head-only tuning and LoRA, measured."""
__version__ = "0.1.0"
