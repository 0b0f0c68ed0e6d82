// Step 7's CPU kernels, each small and each tested against the torch code it replaces
// (tests/test_step7_paged_engine.py):
//
// - paged_attention_rows: attention over the paged KV pool, reading keys and values in place;
// - rope_and_store_: rotary embedding of q and k, in place, and k, v written to their slots;
// - add_rms_norm_: the residual add and the next RMSNorm, in one pass over the row;
// - silu_mul: the MLP's SiLU(gate) * up, in one pass;
// - small_linear: x @ w.T for a few rows (decoding at low concurrency), at memory speed.
//
// Why: the README's profile. Attention first (it was half of an iteration at 64 sequences):
//
// The torch version (attention.py) first gathers every sequence's whole context out of the pool
// into a padded [B, context, kv_heads, head_dim] copy, per layer, then runs SDPA over the copy:
// at 64 sequences of ~350 tokens that copy is about 1 GB per iteration, read twice. Here each
// sequence's keys and values are read once, where they are, through its block table:
//
//   slot of token t = block_table[t / block_size] * block_size + t % block_size
//
// One task per (sequence, kv head): its `group` query heads (grouped-query attention) share
// every key and value row that is loaded. Scores are kept whole (contexts are at most a few
// thousand tokens), then a plain softmax, then the weighted sum of the values.
//
// A row is one query token: a decoding sequence's new token, or a token of a short prefill
// chunk, which sees its own position and everything before it (`lengths`).
//
// Arithmetic is float32 throughout; sums accumulate in 8 lanes, which the compiler turns into
// AVX2 fused multiply-adds, 8 elements at a time.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  for (int64_t d = 0; d < n; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[d + j] * b[d + j];
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Four independent 8-lane accumulators: more loads in flight, shorter dependency chains.
inline float dot4(const float* a, const float* b, int64_t n) {
  float acc[4][kLanes] = {{0}};
  for (int64_t d = 0; d < n; d += 4 * kLanes) {
    for (int64_t u = 0; u < 4; ++u) {
      for (int64_t j = 0; j < kLanes; ++j) acc[u][j] += a[d + u * kLanes + j] * b[d + u * kLanes + j];
    }
  }
  float total = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) total += (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
  return total;
}

inline void add_scaled(float* out, const float* v, float weight, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += weight * v[d];
}

}  // namespace

// q:            [B, heads, head_dim]          one query token per row
// k_pool:       [slots, kv_heads, head_dim]   one layer of the pool (keys)
// v_pool:       [slots, kv_heads, head_dim]   one layer of the pool (values)
// block_tables: [B, max_blocks] int64         each row's sequence's block ids (extra unused)
// lengths:      [B] int64                     the context each row sees, its own token included
// returns       [B, heads, head_dim]
torch::Tensor paged_attention_rows(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor lengths,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_pool.scalar_type() == torch::kFloat32,
              "paged_attention_rows: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_attention_rows: each row's "
              "heads must be contiguous (rows may be strided)");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && block_tables.is_contiguous() &&
                  lengths.is_contiguous(),
              "paged_attention_rows: contiguous pool, tables and lengths only");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(head_dim % kLanes == 0, "paged_attention_rows: head_dim must be a multiple of 8");
  const int64_t q_row_stride = q.stride(0);
  auto out = torch::zeros({batch, heads, head_dim}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, context]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kv_head = task % kv_heads;
      const int64_t context = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const float* queries = qp + b * q_row_stride + kv_head * group * head_dim;  // [group, dim]
      scores.assign(group * context, 0.0f);
      // Scores: each key row is loaded once for the whole group.
      for (int64_t t = 0; t < context; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* key = kp + (slot * kv_heads + kv_head) * head_dim;
        for (int64_t g = 0; g < group; ++g)
          scores[g * context + t] = scale_f * dot(queries + g * head_dim, key, head_dim);
      }
      // Softmax per query head.
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * context;
        const float top = *std::max_element(s, s + context);
        float total = 0.0f;
        for (int64_t t = 0; t < context; ++t) total += (s[t] = std::exp(s[t] - top));
        for (int64_t t = 0; t < context; ++t) s[t] /= total;
      }
      // Weighted sum of the values: each value row is loaded once for the whole group.
      float* outputs = op + (b * heads + kv_head * group) * head_dim;  // [group, head_dim]
      for (int64_t t = 0; t < context; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* value = vp + (slot * kv_heads + kv_head) * head_dim;
        for (int64_t g = 0; g < group; ++g)
          add_scaled(outputs + g * head_dim, value, scores[g * context + t], head_dim);
      }
    }
  });
  return out;
}

// qkv:          [T, heads + 2 * kv_heads, head_dim] float32, contiguous: the fused projection
// cos, sin:     [T, head_dim]                 each token's rotary angles
// k_pool/v_pool:[slots, kv_heads, head_dim]   one layer of the pool
// slots:        [T] int64                     where each token's key and value go
// Rotates the q and k heads in place, as transformers does: x * cos + rotate_half(x) * sin,
// rotate_half(x) = (-x[half:], x[:half]); then copies each token's k and v into its slot.
void rope_and_store_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slots) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() &&
                  cos.is_contiguous() && sin.is_contiguous() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && slots.is_contiguous(),
              "rope_and_store_: contiguous float32 only");
  const int64_t tokens = qkv.size(0), all_heads = qkv.size(1), head_dim = qkv.size(2);
  const int64_t kv_heads = k_pool.size(1), rotated = all_heads - kv_heads, half = head_dim / 2;
  float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * head_dim;
      const float* s = sp + t * head_dim;
      for (int64_t h = 0; h < rotated; ++h) {  // the q heads, then the k heads
        float* x = xp + (t * all_heads + h) * head_dim;
        for (int64_t d = 0; d < half; ++d) {
          const float first = x[d], second = x[d + half];
          x[d] = first * c[d] + -second * s[d];
          x[d + half] = second * c[d + half] + first * s[d + half];
        }
      }
      const float* k = xp + (t * all_heads + rotated - kv_heads) * head_dim;
      const float* v = xp + (t * all_heads + rotated) * head_dim;
      std::copy(k, k + kv_heads * head_dim, kp + slot[t] * kv_heads * head_dim);
      std::copy(v, v + kv_heads * head_dim, vp + slot[t] * kv_heads * head_dim);
    }
  });
}

// x, delta: [T, hidden] float32, contiguous. x += delta in place (the residual stream); returns
// RMSNorm(x) * weight, as LlamaRMSNorm computes it: x * (1 / sqrt(mean(x^2) + eps)) * weight.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor delta, torch::Tensor weight,
                            double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && delta.is_contiguous(),
              "add_rms_norm_: contiguous float32 only");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(hidden % kLanes == 0, "add_rms_norm_: hidden size must be a multiple of 8");
  auto out = torch::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * hidden;
      const float* dr = dp + r * hidden;
      float acc[kLanes] = {0};
      for (int64_t h = 0; h < hidden; h += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) {
          xr[h + j] += dr[h + j];
          acc[j] += xr[h + j] * xr[h + j];
        }
      }
      float squares = 0.0f;
      for (int64_t j = 0; j < kLanes; ++j) squares += acc[j];
      const float inverse = 1.0f / std::sqrt(squares / hidden + static_cast<float>(eps));
      float* orow = op + r * hidden;
      for (int64_t h = 0; h < hidden; ++h) orow[h] = wp[h] * (xr[h] * inverse);
    }
  });
  return out;
}

// gate_up: [T, 2 * intermediate] float32, contiguous, gate then up (one fused matmul's output).
// returns [T, intermediate]: SiLU(gate) * up, SiLU(g) = g / (1 + exp(-g)).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.is_contiguous(),
              "silu_mul: contiguous float32 only");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  auto out = torch::empty({rows, width}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gp + r * 2 * width;
      const float* up = gate + width;
      float* orow = op + r * width;
      for (int64_t i = 0; i < width; ++i) orow[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// x: [M, in], w: [out, in], float32, contiguous, M small -> [M, out]. Each weight row is read
// from memory once and used for all M rows of x while it is in the L1 cache; threads split the
// weight's rows. For one or a few rows this is a memory-bound stream, and a plain loop reaches
// the machine's bandwidth where a GEMM library spends its time setting up (the README).
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && w.is_contiguous(),
              "small_linear: contiguous float32 only");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  TORCH_CHECK(in % (4 * kLanes) == 0, "small_linear: in features must be a multiple of 32");
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r = 0; r < rows; ++r) yp[r * out + n] = dot4(wp + n * in, xp + r * in, in);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &small_linear, "x @ w.T for a few rows of x (float32)");
  m.def("paged_attention_rows", &paged_attention_rows,
        "Attention of one query per row over the paged KV pool, read in place (float32, CPU)");
  m.def("rope_and_store_", &rope_and_store_,
        "Rotary embedding of q and k in place; k and v written to their pool slots (float32)");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta; returns RMSNorm(x) * weight (float32)");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of a [T, 2I] gate/up output (float32)");
}
