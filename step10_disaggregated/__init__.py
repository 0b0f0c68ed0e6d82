"""Step 10: prefill and decode on separate engines, the prompt's KV blocks handed over, exact."""

from step7_real_kv.speed.omp_spin import before_torch

before_torch()  # OpenMP's spin count, read once as torch loads (speed/omp_spin.py)
