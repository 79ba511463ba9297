"""The ``lora-lab-bench`` command: how fast and how large each fine-tuning method is, measured.

    lora-lab-bench                                   # the embedded MiniLM-L6 (about 5 min on 2 CPU cores)
    lora-lab-bench model=tiny quick=true             # under a minute: checks the benchmark, not the numbers
    python -m lora_lab.bench batch_size=8 seq_len=64 methods=[lora_r8,houlsby]

Everything is measured in this one process. Each timed section builds every variant once, keeps it,
and runs the variants round-robin (A/B/C/A/B/C ..., the first of each round rotating), so drift in the
machine's speed hits all of them alike; warm-up rounds are dropped; a figure is the median over the
rounds, shown with its min-max, and a ratio is the quotient of two medians. Every timed sample also
records how much CPU other processes took meanwhile (from /proc/stat); disturbed samples are counted
and flagged in the output, since on a small machine one concurrent job ruins the timings.

1. Training step (forward + backward + AdamW step) per method, relative to the frozen-backbone limit:
   the same model with only the head training and gradients flowing through every frozen layer down
   to the embedding output, which is what any method that adapts every layer must at least pay.
2. Our LoRA against PEFT's LoRA (same model, rank, alpha, target modules, dropout 0), if peft imports.
3. Inference latency: base model, LoRA unmerged, LoRA merged.
4. Memory per method: weights, gradients, optimiser state, saved activations (from the tensors
   themselves on CPU, where the process RSS is too coarse; plus the peak allocation on CUDA).
5. Data path: LoRA training tokens/s on the real data, per-batch padding vs fixed-length padding.
6. Sweep overhead: process start to first step of ``lora-lab``, cold and warm tokenised-data cache.
7. The factored-vs-dense SVD speed-up of ``analysis.bench_subspace``, when that module is present.

Prints Markdown tables, each target with PASS/FAIL, and writes all samples to a JSON file. One module
per section (training_step, inference, memory, data_path, startup, subspace), plus timing, variants,
report and run.
"""
from lora_lab.bench.run import main, run_benchmark
from lora_lab.bench.variants import CONTROL, REFERENCE

__all__ = ["CONTROL", "REFERENCE", "main", "run_benchmark"]
