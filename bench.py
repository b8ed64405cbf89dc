"""
Every benchmark and every comparison with diffusers, out of the tutorial files: `python bench.py WHAT -h`.

    python bench.py dit --preset cosmos2b --device cuda --dtype bf16 --compare-diffusers
    python bench.py vae --device cuda --dtype bf16 --frames 13 61
    python bench.py dino --device cuda --dtype bf16 --batch 32
    python bench.py decode
    python bench.py train --preset paper --peak-tflops 989
    python bench.py sample --preset cosmos2b --device cuda --dtype bf16 --compare-diffusers
    python bench.py costs

Speed and memory are measured here, never asserted in tests. Figures are per call, after warmup, with CUDA
synchronized around the timed region; peak memory is torch's allocator peak.
"""

import argparse
import sys

# === train: owned by the train helper (bench_train / add_train_args) ===
