"""The ``lora-lab-bench`` command: how fast and how large each fine-tuning method is, measured.

    lora-lab-bench                                   # the embedded MiniLM-L6 (minutes on 2 CPU cores)
    lora-lab-bench model=tiny quick=true             # under a minute: checks the benchmark, not the numbers
    python -m lora_lab.bench batch_size=8 seq_len=64 arms=[lora_r8,houlsby] peft.arms=[lora_r8]

Everything is measured in this one process. Each timed section builds every variant once, keeps it,
and runs the variants round-robin (A/B/C/A/B/C ..., the first of each round rotating), so drift in the
machine's speed hits all of them alike; warm-up rounds are dropped; a figure is the median over the
rounds, shown with its min-max, and a ratio is the quotient of two medians. Every timed sample also
records how much CPU other processes took meanwhile (from /proc/stat); disturbed samples are counted
and flagged in the output, since on a small machine one concurrent job ruins the timings.

1. Training step (forward + backward + AdamW step) per arm (conf/arm: a method with its size),
   relative to the frozen-backbone limit: the same model with only the head training and gradients
   flowing through every frozen layer down to the embedding output, which is what any method that
   adapts every layer must at least pay.
2. Each arm whose method has a PEFT counterpart (LoRA, DoRA, (IA)³) against its PEFT twin: same
   settings, our weights copied in, logits compared before timing (needs peft).
3. Memory per arm: weights, gradients, optimiser state, saved activations (from the tensors
   themselves on CPU, where the process RSS is too coarse; plus the peak allocation on CUDA).
4. Inference latency: base model, a mergeable arm unmerged and merged.

Prints Markdown tables, each target with PASS/FAIL, and writes all samples to a JSON file. One module
per section (training_step, memory, inference), plus variants, report and run; the timing helpers
are lora_lab.runtime.timing, shared with the trainer.
"""
from lora_lab.bench.run import main, run_benchmark
from lora_lab.bench.variants import CONTROL, REFERENCE

__all__ = ["CONTROL", "REFERENCE", "main", "run_benchmark"]
