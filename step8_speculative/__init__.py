"""Step 8: speculative decoding (prompt lookup) on step 7's engine, exact."""

from step7_real_kv.speed.omp_spin import before_torch

before_torch()  # OpenMP's spin count, read once as torch loads (speed/omp_spin.py)
