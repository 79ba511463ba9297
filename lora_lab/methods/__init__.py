"""Fine-tuning methods, each registered by name. Importing this package imports every module in it,
so a new method is one new file here (plus its config in conf/method)."""
import importlib
import pkgutil

from lora_lab.methods.base import DeltaW, Method, available_methods, build_method, describe_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DeltaW", "Method", "available_methods", "build_method", "describe_method", "register"]
