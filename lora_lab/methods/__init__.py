"""Fine-tuning methods, each registered by name. Importing this package registers them all."""
from lora_lab.methods import adapter, full, head, lora  # noqa: F401  (registration side effects)
from lora_lab.methods.base import DeltaW, Method, available_methods, build_method, register

__all__ = ["DeltaW", "Method", "available_methods", "build_method", "register"]
