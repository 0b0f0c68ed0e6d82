"""Step 7: continuous batching over a paged KV cache, with prefix caching."""

from step7_real_kv.speed.omp_spin import before_torch

before_torch()  # OpenMP's spin count, read once as torch loads (speed/omp_spin.py)
