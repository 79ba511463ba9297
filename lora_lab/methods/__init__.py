"""Fine-tuning methods, each registered by name.

A method is one module and one config. The module defines a ``Method`` subclass decorated with
``@register("<name>")``; the class answers everything the rest of the project asks of the method (its
settings' rules, what it trains and refuses, merging, PEFT, benchmark arms, table and plot order,
its parameter formula; see ``lora_lab.methods.base``). The config, ``method/<name>.yaml``, holds
``name: <name>``, ``lr``, ``lr_grid`` and the method's own settings.

Importing this package imports every module in it, so a method shipped with lora_lab is a file here
plus ``conf/method/<name>.yaml``.

A method kept outside lora_lab is a module anywhere on the Python path (installed, or a folder on
PYTHONPATH) plus a config in a config folder of one's own; the config names the module, which the
registry imports the first time the name is asked for (``method_class``)::

    # ~/my_conf/method/ln_only.yaml
    name: ln_only
    module: my_methods.ln_only   # imported when method.name=ln_only is not registered yet
    lr: 1e-3
    lr_grid: [1e-4, 1e-3]

    PYTHONPATH=~/code lora-lab hydra.searchpath=[file://$HOME/my_conf] method=ln_only

``method.module`` is part of the config, so run records keep it and the analysis tools describe the
run with the method's own class wherever that module can be imported.
"""
import importlib
import pkgutil

from lora_lab.methods.base import (
    DeltaW,
    Method,
    available_methods,
    build_method,
    describe_method,
    method_class,
    register,
    registered_methods,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DeltaW", "Method", "available_methods", "build_method", "describe_method", "method_class", "register",
           "registered_methods"]
