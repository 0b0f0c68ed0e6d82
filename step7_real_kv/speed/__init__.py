"""Step 7's speed layer: what makes the lesson's engine fast on a CPU, and nothing it needs.

The engine, scheduler, block manager, batch and model_runner.py's torch code are the lesson and
run on their own (`--kernels torch --linear-backend torch`). This package replaces pieces of
the runner's arithmetic with faster ones that compute the same thing (README, "The speed
layer": what each buys, measured):

- cpu_kernels.cpp: six C++ kernels (attention of one query per row over the pool, rotary + K/V
  store, residual add + RMSNorm, SiLU * up, small_linear, block_linear); cpu_kernels.py builds
  them once, ahead of time (`python -m step7_real_kv.speed.cpu_kernels`), and loads them.
- kernel_ops.py: KernelOps, the runner's row-wise ops through those kernels.
- linear.py: FastLinear, the matmul by oneDNN with prepacked weights, small_linear or
  block_linear, chosen per call by its number of rows.
- stored_weights.py: the GGUF's Q4_1/Q8_0 blocks, and the proof that they are the model's
  float32 weights bit for bit.
- torch_thread.py: the one thread that loads the model, builds the engine and runs every
  forward pass, so OpenMP keeps one team; omp_spin.py: how long that team's idle workers spin
  (GOMP_SPINCOUNT, set before torch loads).

The knobs: `--kernels torch` (GATEWAY_KERNELS) leaves the C++ kernels unloaded, and with them
the stored blocks; `--linear-backend torch` leaves oneDNN out; `--weight-format float32` keeps
the blocks unread.

Nothing is imported here, so that building the kernels imports only what it needs.
"""
