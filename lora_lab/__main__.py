"""``python -m lora_lab ...`` is the ``lora-lab`` command."""
from lora_lab.cli.main import main

main()
