// Step 7's CPU kernels, each small and each tested against the torch code it replaces
// (tests/test_step7_kernels.py):
//
// - paged_attention_rows: attention over the paged KV pool, reading keys and values in place;
// - rope_and_store_: rotary embedding of q and k, in place, and k, v written to their slots;
// - add_rms_norm_: the residual add and the next RMSNorm, in one pass over the row;
// - silu_mul: the MLP's SiLU(gate) * up, in one pass;
// - small_linear: x @ w.T for a few rows (decoding at low concurrency), at memory speed;
// - block_linear: the same, the weights read as GGUF stores them (Q4_1 / Q8_0 blocks).
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
// chunk, which sees its own position and everything before it (`lengths`). The rows of one
// chunk (or of one step 8 verification) share a task too, up to 8 of them (`row_runs`): a few
// tokens at the end of a long prompt read its keys and values once, not once a token.
//
// Arithmetic is float32 throughout, in AVX2 registers of 8 floats with fused multiply-adds. A
// query head's dots are taken with 8 keys at once (8 independent accumulators, then one
// 8-by-8 reduction: `dots_with_8_keys`), and a head's output stays in registers while the
// values are added into it (`add_weighted_values`). Written as plain loops, one dot at a time,
// the same kernel was compute-bound at 64 sequences, twice as slow where the keys are cached (a
// shared prefix: the README's profile, "The attention kernel, by hand"); where each sequence's
// keys come from memory it gains less.
//
// Manners: every kernel checks its inputs (dtype, device, shape, contiguity and every index it
// will follow) before it touches memory, and raises a RuntimeError naming itself and the
// argument; the checks are serial and O(rows) or O(blocks read), before the parallel loop. Every
// binding releases the GIL while it runs (the event loop keeps serving meanwhile).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;

// A dtype as torch spells it in Python: float32, not Float.
std::string dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "float32";
    case torch::kFloat64: return "float64";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    case torch::kInt64: return "int64";
    case torch::kInt32: return "int32";
    case torch::kUInt8: return "uint8";
    case torch::kInt8: return "int8";
    default: return c10::toString(dtype);
  }
}

// t is a CPU tensor of this dtype with this many dims.
void check_tensor(const torch::Tensor& t, const char* kernel, const char* name,
                  torch::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), kernel, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, kernel, ": ", name, " must be ", dtype_name(dtype),
              ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == dims, kernel, ": ", name, " must be ", dims, "-D, got shape ",
              t.sizes());
}

void check_contiguous(const torch::Tensor& t, const char* kernel, const char* name) {
  TORCH_CHECK(t.is_contiguous(), kernel, ": ", name, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), ")");
}

// k_pool and v_pool: [slots, kv_heads, head_dim] float32, contiguous, the same shape.
void check_pools(const torch::Tensor& k_pool, const torch::Tensor& v_pool, const char* kernel) {
  check_tensor(k_pool, kernel, "k_pool", torch::kFloat32, 3);
  check_tensor(v_pool, kernel, "v_pool", torch::kFloat32, 3);
  check_contiguous(k_pool, kernel, "k_pool");
  check_contiguous(v_pool, kernel, "v_pool");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), kernel, ": k_pool and v_pool must have the same "
              "shape, got ", k_pool.sizes(), " and ", v_pool.sizes());
  TORCH_CHECK(k_pool.size(1) >= 1, kernel, ": the pool must have at least one kv head");
}

// Every row's length is in [1, max_blocks * block_size] and every block id it reads is in
// [0, num_blocks): O(blocks read), so that the parallel loop never leaves the pool.
void check_tables(const int64_t* tables, const int64_t* lens, int64_t batch, int64_t max_blocks,
                  int64_t block_size, int64_t num_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t context = lens[b];
    TORCH_CHECK(context >= 1 && context <= max_blocks * block_size,
                "paged_attention_rows: lengths[", b, "] = ", context, " is outside [1, ",
                max_blocks * block_size, "] (max_blocks ", max_blocks, " * block_size ",
                block_size, ")");
    const int64_t* table = tables + b * max_blocks;
    for (int64_t i = 0; i < (context + block_size - 1) / block_size; ++i) {
      TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "paged_attention_rows: block_tables[",
                  b, "][", i, "] = ", table[i], " is outside the pool's [0, ", num_blocks,
                  ") blocks");
    }
  }
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

// The attention arithmetic, 8 floats to a register (AVX2; AVX-512 machines run the same code).
// A head's 64 dims are C = head_dim / 8 registers; C is a template parameter, so that a head's
// accumulators stay in registers.
constexpr int kMaxChunks = 16;  // head_dim up to 128

// Eight sums at once: lane j of the result is the sum of a[j]'s 8 lanes, added in the same order
// for every j ((0+1) + (2+3)) + ((4+5) + (6+7)), whichever 8 vectors come together. Reducing each
// vector on its own takes 6 instructions; this takes 9 for all 8.
inline __m256 sums_of_8(const __m256 a[8]) {
  const __m256 pairs01 = _mm256_hadd_ps(a[0], a[1]), pairs23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 pairs45 = _mm256_hadd_ps(a[4], a[5]), pairs67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 low_high0 = _mm256_hadd_ps(pairs01, pairs23);  // a0..a3: low halves | high halves
  const __m256 low_high1 = _mm256_hadd_ps(pairs45, pairs67);  // a4..a7: likewise
  return _mm256_add_ps(_mm256_permute2f128_ps(low_high0, low_high1, 0x20),
                       _mm256_permute2f128_ps(low_high0, low_high1, 0x31));
}

// One query head's dot products with 8 keys, one per lane: 8 accumulators, one per key, so that
// 8 independent chains of fused multiply-adds keep the FMA units busy; then one sums_of_8.
template <int C>
inline __m256 dots_with_8_keys(const float* query, const float* const keys[8]) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int c = 0; c < C; ++c) {
    const __m256 q = _mm256_loadu_ps(query + 8 * c);
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm256_fmadd_ps(q, _mm256_loadu_ps(keys[j] + 8 * c), acc[j]);
  }
  return sums_of_8(acc);
}

// out += the sum over j < n of weights[j] * (the value row at values + j * stride): the head's
// C registers of output stay in registers over the n values, each weight broadcast once.
template <int C>
inline void add_weighted_values(float* out, const float* weights, const float* values,
                                int64_t stride, int64_t n) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_loadu_ps(out + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(weights[j]);
    for (int c = 0; c < C; ++c)
      acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + j * stride + 8 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// Ask for `count` rows of the pool, `stride` floats apart from `row` on (`width` floats of each:
// one kv head's), before they are needed. The next block is wherever the table points: the
// hardware prefetcher does not see that coming. Keys are asked for 8 rows at a time, spread
// over the current block's work: asked for all at once, they were slower than none.
inline void prefetch_rows(const float* row, int64_t count, int64_t stride, int64_t width) {
  for (int64_t j = 0; j < count; ++j, row += stride)
    for (int64_t byte = 0; byte < width * 4; byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}

// Consecutive rows that are consecutive tokens of one sequence (a prefill chunk, or step 8's
// verification of a draft): each row's length one more than the row before, and the tables
// equal over every block the shorter row reads. Such a run is one task per kv head: every key
// and value row is read once for all its rows, not once per row, and each row's arithmetic is
// what it would be alone (the same dots, the same order of sums). Runs stop at kMaxRun rows,
// so that a long chunk still gives both threads work. Returns the runs' first rows, then batch.
constexpr int64_t kMaxRun = 8;

std::vector<int64_t> row_runs(const int64_t* tables, const int64_t* lens, int64_t batch,
                              int64_t max_blocks, int64_t block_size) {
  std::vector<int64_t> starts;
  for (int64_t b = 0; b < batch; ++b) {
    const bool joins =
        b > 0 && b - starts.back() < kMaxRun && lens[b] == lens[b - 1] + 1 &&
        std::equal(tables + (b - 1) * max_blocks,
                   tables + (b - 1) * max_blocks + (lens[b - 1] + block_size - 1) / block_size,
                   tables + b * max_blocks);
    if (!joins) starts.push_back(b);
  }
  starts.push_back(batch);
  return starts;
}

// What every task of one call reads.
struct Attention {
  const float* q;  // [B, heads, head_dim], rows q_row_stride apart
  int64_t q_row_stride;
  const float* k_pool;  // [slots, kv_heads, head_dim]
  const float* v_pool;
  float* out;  // [B, heads, head_dim], zeros
  const int64_t* tables;  // [B, max_blocks]
  const int64_t* lens;    // [B]
  int64_t max_blocks, block_size, heads, kv_heads, group, head_dim;
  float scale;
};

// One task: the rows [first_row, first_row + rows) of a run, for one kv head. Every row's
// arithmetic is what it would be alone: the same dots of 8 keys (the same keys together, at the
// same places in their blocks) and the same order of value sums, whichever rows share the task.
template <int C>
void attend(const Attention& a, int64_t first_row, int64_t rows, int64_t kv_head,
            std::vector<float>& scores) {
  const int64_t bs = a.block_size, group = a.group, head_dim = a.head_dim;
  const int64_t last = first_row + rows - 1;  // the longest row: its table serves them all
  const int64_t context = a.lens[last];
  const int64_t* table = a.tables + last * a.max_blocks;
  const int64_t lanes = rows * group;  // one (row, query head) pair per lane of scores
  const int64_t stride = a.kv_heads * head_dim;  // from one slot's kv head to the next slot's
  const int64_t width = context + 8;  // a lane of scores, with room for a last store of 8
  scores.resize(lanes * width);
  const __m256 scale = _mm256_set1_ps(a.scale);
  // The kv head's row of a slot of the pool.
  auto row_of = [&](const float* pool, int64_t slot) {
    return pool + slot * stride + kv_head * head_dim;
  };
  // Scores, 8 keys of a block at a time: while they are in L1, every row of the run and every
  // query head of the group scores them; a row keeps only the keys it sees (t < its length).
  for (int64_t start = 0; start < context; start += bs) {
    const int64_t first = table[start / bs] * bs;
    const int64_t n = std::min(bs, context - start);
    const float* next_keys =
        start + bs < context ? row_of(a.k_pool, table[start / bs + 1] * bs) : nullptr;
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const int64_t m = std::min<int64_t>(8, n - j0);
      if (next_keys)
        prefetch_rows(next_keys + j0 * stride, std::min<int64_t>(8, bs - j0), stride, head_dim);
      const float* keys[8];  // lanes past the block's last key score its first key, unkept
      for (int64_t j = 0; j < 8; ++j) keys[j] = row_of(a.k_pool, first + j0 + (j < m ? j : 0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t seen = std::min(m, a.lens[first_row + r] - (start + j0));
        if (seen <= 0) continue;
        const float* queries = a.q + (first_row + r) * a.q_row_stride + kv_head * group * head_dim;
        for (int64_t g = 0; g < group; ++g) {  // all 8 lanes stored: those past `seen` unread
          const __m256 dots = dots_with_8_keys<C>(queries + g * head_dim, keys);
          _mm256_storeu_ps(scores.data() + (r * group + g) * width + start + j0,
                           _mm256_mul_ps(scale, dots));
        }
      }
    }
  }
  // Softmax per row and query head, over the keys that row sees.
  for (int64_t lane = 0; lane < lanes; ++lane) {
    const int64_t seen = a.lens[first_row + lane / group];
    float* s = scores.data() + lane * width;
    const float top = *std::max_element(s, s + seen);
    float total = 0.0f;
    for (int64_t t = 0; t < seen; ++t) total += (s[t] = std::exp(s[t] - top));
    for (int64_t t = 0; t < seen; ++t) s[t] /= total;
  }
  // The weighted sum of the values, block by block: a block's value rows are loaded for every
  // row of the run while they are in L1.
  for (int64_t start = 0; start < context; start += bs) {
    const int64_t first = table[start / bs] * bs;
    const int64_t n = std::min(bs, context - start);
    if (start + bs < context)
      prefetch_rows(row_of(a.v_pool, table[start / bs + 1] * bs), bs, stride, head_dim);
    const float* values = row_of(a.v_pool, first);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t seen = std::min(n, a.lens[first_row + r] - start);
      if (seen <= 0) continue;
      float* outputs = a.out + ((first_row + r) * a.heads + kv_head * group) * head_dim;
      for (int64_t g = 0; g < group; ++g)
        add_weighted_values<C>(outputs + g * head_dim,
                               scores.data() + (r * group + g) * width + start, values, stride,
                               seen);
    }
  }
}

// attend<C> for C = 1 .. kMaxChunks, by head_dim / 8 - 1.
using AttendTask = void (*)(const Attention&, int64_t, int64_t, int64_t, std::vector<float>&);
template <std::size_t... I>
constexpr std::array<AttendTask, sizeof...(I)> attend_tasks(std::index_sequence<I...>) {
  return {&attend<static_cast<int>(I) + 1>...};
}
constexpr auto kAttendTasks = attend_tasks(std::make_index_sequence<kMaxChunks>{});

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
  constexpr const char* kName = "paged_attention_rows";
  check_tensor(q, kName, "q", torch::kFloat32, 3);
  check_pools(k_pool, v_pool, kName);
  check_tensor(block_tables, kName, "block_tables", torch::kInt64, 2);
  check_tensor(lengths, kName, "lengths", torch::kInt64, 1);
  check_contiguous(block_tables, kName, "block_tables");
  check_contiguous(lengths, kName, "lengths");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  // q's rows may be strided (q is a view of the fused qkv), each row's heads contiguous.
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == head_dim &&
                  (batch <= 1 || q.stride(0) >= heads * head_dim),
              "paged_attention_rows: each row of q must hold its heads contiguously (rows may be "
              "strided), got shape ", q.sizes(), ", strides ", q.strides());
  const int64_t kv_heads = k_pool.size(1);
  TORCH_CHECK(heads >= 1 && heads % kv_heads == 0, "paged_attention_rows: q's ", heads,
              " heads must be a multiple of the pool's ", kv_heads, " kv heads");
  const int64_t group = heads / kv_heads;
  TORCH_CHECK(k_pool.size(2) == head_dim, "paged_attention_rows: q's head_dim ", head_dim,
              " differs from the pool's ", k_pool.size(2));
  TORCH_CHECK(head_dim % 8 == 0 && head_dim <= 8 * kMaxChunks,
              "paged_attention_rows: head_dim must be a multiple of 8 up to ", 8 * kMaxChunks,
              ", got ", head_dim);
  TORCH_CHECK(block_tables.size(0) == batch && lengths.size(0) == batch,
              "paged_attention_rows: block_tables and lengths need one row per row of q (",
              batch, "), got ", block_tables.sizes(), " and ", lengths.sizes());
  TORCH_CHECK(block_size >= 1, "paged_attention_rows: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(k_pool.size(0) % block_size == 0, "paged_attention_rows: the pool's ",
              k_pool.size(0), " slots are not a whole number of blocks of ", block_size);
  const int64_t max_blocks = block_tables.size(1), num_blocks = k_pool.size(0) / block_size;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  check_tables(tables, lens, batch, max_blocks, block_size, num_blocks);
  auto out = torch::zeros({batch, heads, head_dim}, q.options());
  const Attention a{q.data_ptr<float>(), q.stride(0), k_pool.data_ptr<float>(),
                    v_pool.data_ptr<float>(), out.data_ptr<float>(), tables, lens, max_blocks,
                    block_size, heads, kv_heads, group, head_dim, static_cast<float>(scale)};
  const AttendTask attend_task = kAttendTasks[head_dim / 8 - 1];
  const std::vector<int64_t> runs = row_runs(tables, lens, batch, max_blocks, block_size);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
  at::parallel_for(0, num_runs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [rows, group, context]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / kv_heads;
      attend_task(a, runs[run], runs[run + 1] - runs[run], task % kv_heads, scores);
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
  constexpr const char* kName = "rope_and_store_";
  check_tensor(qkv, kName, "qkv", torch::kFloat32, 3);
  check_tensor(cos, kName, "cos", torch::kFloat32, 2);
  check_tensor(sin, kName, "sin", torch::kFloat32, 2);
  check_pools(k_pool, v_pool, kName);
  check_tensor(slots, kName, "slots", torch::kInt64, 1);
  check_contiguous(qkv, kName, "qkv");
  check_contiguous(cos, kName, "cos");
  check_contiguous(sin, kName, "sin");
  check_contiguous(slots, kName, "slots");
  const int64_t tokens = qkv.size(0), all_heads = qkv.size(1), head_dim = qkv.size(2);
  const int64_t kv_heads = k_pool.size(1), rotated = all_heads - kv_heads, half = head_dim / 2;
  const int64_t q_heads = all_heads - 2 * kv_heads;
  TORCH_CHECK(q_heads >= 1 && q_heads % kv_heads == 0, "rope_and_store_: qkv's ", all_heads,
              " heads must be q heads + 2 * ", kv_heads, " kv heads, with the q heads a multiple "
              "of the kv heads");
  TORCH_CHECK(k_pool.size(2) == head_dim, "rope_and_store_: qkv's head_dim ", head_dim,
              " differs from the pool's ", k_pool.size(2));
  TORCH_CHECK(head_dim % 2 == 0, "rope_and_store_: head_dim must be even, got ", head_dim);
  TORCH_CHECK(cos.size(0) == tokens && cos.size(1) == head_dim && cos.sizes() == sin.sizes(),
              "rope_and_store_: cos and sin must be [", tokens, ", ", head_dim, "], got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(slots.size(0) == tokens, "rope_and_store_: slots needs one slot per token (", tokens,
              "), got ", slots.size(0));
  float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t pool_slots = k_pool.size(0);
  for (int64_t t = 0; t < tokens; ++t) {  // before anything is written
    TORCH_CHECK(slot[t] >= 0 && slot[t] < pool_slots, "rope_and_store_: slots[", t, "] = ",
                slot[t], " is outside the pool's [0, ", pool_slots, ") slots");
  }
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
  constexpr const char* kName = "add_rms_norm_";
  check_tensor(x, kName, "x", torch::kFloat32, 2);
  check_tensor(delta, kName, "delta", torch::kFloat32, 2);
  check_tensor(weight, kName, "weight", torch::kFloat32, 1);
  check_contiguous(x, kName, "x");
  check_contiguous(delta, kName, "delta");
  check_contiguous(weight, kName, "weight");
  TORCH_CHECK(x.sizes() == delta.sizes(), "add_rms_norm_: x and delta must have the same shape, "
              "got ", x.sizes(), " and ", delta.sizes());
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.size(0) == hidden, "add_rms_norm_: weight has ", weight.size(0),
              " elements, x's hidden size is ", hidden);
  TORCH_CHECK(hidden % kLanes == 0, "add_rms_norm_: hidden size must be a multiple of 8, got ",
              hidden);
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
  check_tensor(gate_up, "silu_mul", "gate_up", torch::kFloat32, 2);
  check_contiguous(gate_up, "silu_mul", "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up's width must be even (gate then up), "
              "got ", gate_up.size(1));
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
  check_tensor(x, "small_linear", "x", torch::kFloat32, 2);
  check_tensor(w, "small_linear", "w", torch::kFloat32, 2);
  check_contiguous(x, "small_linear", "x");
  check_contiguous(w, "small_linear", "w");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  TORCH_CHECK(w.size(1) == in, "small_linear: x has ", in, " in features, w has ", w.size(1));
  TORCH_CHECK(in % (4 * kLanes) == 0, "small_linear: in features must be a multiple of 32, got ",
              in);
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

// ---------------------------------------------------------------- weights as GGUF stores them
//
// At one sequence a decode step reads every weight once, and the bytes read set its speed. The
// model's only source is a GGUF file whose layers are Q4_1 blocks and whose embedding is Q8_0
// (ggml-common.h), 32 weights a block:
//
//   Q4_1: { float16 d; float16 m; uint8 qs[16]; }  20 bytes   weight j = d * q_j + m, q_j the
//         low nibble of qs[j] for j < 16, the high nibble of qs[j - 16] for j >= 16
//   Q8_0: { float16 d; int8 qs[32]; }              34 bytes   weight j = d * qs[j]
//
// The float32 checkpoint holds exactly these weights (common/model.py dequantized the file;
// step7_real_kv/speed/stored_weights.py checks every block against it, bit for bit, at load),
// so x @ W.T can read the blocks instead: 20 bytes for 32 weights where float32 reads 128. Each
// block's 32 weights are computed in registers exactly as the checkpoint holds them, then
// multiplied into every row of x, in float32. d * q needs no rounding (a float16's 11
// significant bits times a 4-bit or 8-bit integer fit float32's 24), so the only rounding is
// at + m, as in the dequantization. Only the order of the sums differs from a float32
// matmul's, as with small_linear.
//
// The blocks are memory-light enough that making the weights, not reading them, set the speed
// at one row: a Q4_1 block has only 16 distinct weights, so with AVX-512 each block's 16
// values d * q + m (q = 0..15) are computed once into one register and its 32 weights are
// looked up in it by their nibbles (q4_1_weights): the same floats, in fewer instructions.
// AVX2's registers hold half a table, and there each weight is still converted on its own.

namespace {

constexpr int64_t kBlockWeights = 32;
constexpr int64_t kQ4_1Bytes = 20, kQ8_0Bytes = 34;
constexpr int64_t kMaxBlockRows = 8;  // rows of x computed together per pass over the weights

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// A value the compiler must compute as written: d * q, then + m, as the dequantization wrote it
// (contracted into one FMA it would give the same bits, d * q being exact: this only keeps the
// code as the format describes it).
template <typename V>
inline V exact(V v) {
  __asm__("" : "+x"(v));
  return v;
}

#if defined(__AVX512F__)
constexpr int kVector = 16;  // floats in a register: a block is two registers
using Vec = __m512;
inline Vec signed_bytes_to_floats(__m128i b) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
inline Vec splat(float v) { return _mm512_set1_ps(v); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline float total(Vec v) { return _mm512_reduce_add_ps(v); }

// The 16 values a Q4_1 block's weights can take, d * q + m for q = 0..15, one per lane: the
// same two roundings as each weight's own d * q + m, done once per block instead of per weight.
// d and m (two float16s side by side) are converted together from one 4-byte broadcast, then
// spread by lane: fewer shuffles than converting and broadcasting each.
inline Vec q4_1_table(const uint8_t* block) {
  const Vec iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t dm_bits;
  std::memcpy(&dm_bits, block, 4);
  const Vec dm = _mm512_cvtph_ps(_mm256_set1_epi32(dm_bits));  // d, m, d, m, ...
  return add(exact(mul(_mm512_moveldup_ps(dm), iota)), _mm512_movehdup_ps(dm));
}

// The 32 weights of one Q4_1 block, in 2 registers of 16, looked up in the block's table: each
// byte widened to a 32-bit lane is an index whose low 4 bits are weight j's nibble (vpermps
// reads only those 4 bits, so no mask), and shifted right by 4 it is weight j + 16's. Per block
// that is one widening, one shift and two lookups, where converting each weight took two
// widenings, two masks, two int->float conversions, two multiplies and two adds.
inline void q4_1_weights(const uint8_t* block, Vec w[2]) {
  const Vec table = q4_1_table(block);
  const __m512i qs =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4)));
  w[0] = _mm512_permutexvar_ps(qs, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(qs, 4), table);
}

inline void q8_0_weights(const uint8_t* block, Vec w[2]) {
  const Vec d = splat(half_at(block));
  const __m128i* qs = reinterpret_cast<const __m128i*>(block + 2);
  w[0] = mul(d, signed_bytes_to_floats(_mm_loadu_si128(qs)));
  w[1] = mul(d, signed_bytes_to_floats(_mm_loadu_si128(qs + 1)));
}
#else
constexpr int kVector = 8;  // AVX2: a block is four registers
using Vec = __m256;
inline Vec bytes_to_floats(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline Vec signed_bytes_to_floats(__m128i b) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline Vec splat(float v) { return _mm256_set1_ps(v); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline float total(Vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The 32 weights of one Q4_1 block, in 4 registers of 8, each converted on its own: a register
// of 8 holds only half of a 16-entry table (AVX-512's lookup above).
inline void q4_1_weights(const uint8_t* block, Vec w[4]) {
  const Vec d = splat(half_at(block)), m = splat(half_at(block + 2));
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(qs, nibble);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(qs, 4), nibble);
  const __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
  for (int k = 0; k < 4; ++k) w[k] = add(exact(mul(d, bytes_to_floats(parts[k]))), m);
}

inline void q8_0_weights(const uint8_t* block, Vec w[4]) {
  const Vec d = splat(half_at(block));
  for (int k = 0; k < 4; ++k) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * k));
    w[k] = mul(d, signed_bytes_to_floats(q));
  }
}
#endif

constexpr int kParts = kBlockWeights / kVector;  // registers per block

// With AVX-512 and up to 6 rows of x, two weight rows are computed per pass: their blocks'
// unpacking chains are independent, so one's lookups overlap the other's, and each load of x
// serves both. At 7 and 8 rows the two weight rows' 2 * R * 2 accumulators no longer fit in
// the 32 registers (it ran slower), and AVX2's 16 registers have no room for them at all.
constexpr int kPairedRowsUpTo = kVector == 16 ? 6 : 0;

// y[r, n .. n + N) for R rows of x and N weight rows from n: each block's weights are computed
// once and used for all R rows while they are in registers.
template <int R, int N, bool Q4>
void weight_rows(const float* x, int64_t in, const uint8_t* blocks, int64_t row_bytes, float* y,
                 int64_t out, int64_t n) {
  const int64_t num_blocks = in / kBlockWeights;
  Vec acc[N][R][kParts];
  for (int i = 0; i < N; ++i)
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < kParts; ++k) acc[i][r][k] = zero();
  for (int64_t b = 0; b < num_blocks; ++b) {
    Vec w[N][kParts];
    for (int i = 0; i < N; ++i) {
      const uint8_t* row = blocks + (n + i) * row_bytes;
      if constexpr (Q4) q4_1_weights(row + b * kQ4_1Bytes, w[i]);
      else q8_0_weights(row + b * kQ8_0Bytes, w[i]);
    }
    for (int r = 0; r < R; ++r) {
      const float* xs = x + r * in + b * kBlockWeights;
      for (int k = 0; k < kParts; ++k) {
        const Vec xk = load(xs + k * kVector);
        for (int i = 0; i < N; ++i) acc[i][r][k] = fmadd(xk, w[i][k], acc[i][r][k]);
      }
    }
  }
  for (int i = 0; i < N; ++i) {
    for (int r = 0; r < R; ++r) {
      Vec sum = acc[i][r][0];
      for (int k = 1; k < kParts; ++k) sum = add(sum, acc[i][r][k]);
      y[r * out + n + i] = total(sum);
    }
  }
}

// y[r, n] for R rows of x and the output rows [begin, end).
template <int R, bool Q4>
void block_rows(const float* x, int64_t in, const uint8_t* blocks, int64_t row_bytes,
                float* y, int64_t out, int64_t begin, int64_t end) {
  int64_t n = begin;
  if constexpr (R <= kPairedRowsUpTo)
    for (; n + 2 <= end; n += 2) weight_rows<R, 2, Q4>(x, in, blocks, row_bytes, y, out, n);
  for (; n < end; ++n) weight_rows<R, 1, Q4>(x, in, blocks, row_bytes, y, out, n);
}

template <bool Q4>
void block_rows_any(int R, const float* x, int64_t in, const uint8_t* blocks, int64_t row_bytes,
                    float* y, int64_t out, int64_t begin, int64_t end) {
  switch (R) {
    case 1: return block_rows<1, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 2: return block_rows<2, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 3: return block_rows<3, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 4: return block_rows<4, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 5: return block_rows<5, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 6: return block_rows<6, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    case 7: return block_rows<7, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
    default: return block_rows<8, Q4>(x, in, blocks, row_bytes, y, out, begin, end);
  }
}

}  // namespace

// x: [M, in] float32, contiguous; blocks: [out, in / 32 * block bytes] uint8, contiguous, the
// weight's rows as GGUF stores them; kind: "q4_1" or "q8_0" -> [M, out] float32.
torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind) {
  check_tensor(x, "block_linear", "x", torch::kFloat32, 2);
  check_tensor(blocks, "block_linear", "blocks", torch::kUInt8, 2);
  check_contiguous(x, "block_linear", "x");
  check_contiguous(blocks, "block_linear", "blocks");
  TORCH_CHECK(kind == "q4_1" || kind == "q8_0", "block_linear: kind must be q4_1 or q8_0, got ",
              kind);
  const bool q4 = kind == "q4_1";
  const int64_t rows = x.size(0), in = x.size(1), out = blocks.size(0);
  TORCH_CHECK(in % kBlockWeights == 0, "block_linear: in features must be a multiple of 32, got ",
              in);
  const int64_t row_bytes = in / kBlockWeights * (q4 ? kQ4_1Bytes : kQ8_0Bytes);
  TORCH_CHECK(blocks.size(1) == row_bytes, "block_linear: ", in, " in features in ", kind,
              " blocks are ", row_bytes, " bytes a row, got ", blocks.size(1));
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxBlockRows) {  // more rows: another pass
      const int R = static_cast<int>(std::min(kMaxBlockRows, rows - r0));
      const float* xr = xp + r0 * in;
      float* yr = yp + r0 * out;
      if (q4) block_rows_any<true>(R, xr, in, bp, row_bytes, yr, out, begin, end);
      else block_rows_any<false>(R, xr, in, bp, row_bytes, yr, out, begin, end);
    }
  });
  return y;
}

// Each binding converts its arguments with the GIL held, then releases it for the call (the
// checks and torch::empty need no GIL) and takes it back to return the result.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("small_linear", &small_linear, "x @ w.T for a few rows of x (float32)", release());
  m.def("block_linear", &block_linear,
        "x @ W.T for a few rows of float32 x, W read as GGUF's Q4_1 or Q8_0 blocks", release());
  m.def("paged_attention_rows", &paged_attention_rows,
        "Attention of one query per row over the paged KV pool, read in place (float32, CPU)",
        release());
  m.def("rope_and_store_", &rope_and_store_,
        "Rotary embedding of q and k in place; k and v written to their pool slots (float32)",
        release());
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta; returns RMSNorm(x) * weight (float32)",
        release());
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of a [T, 2I] gate/up output (float32)",
        release());
}
