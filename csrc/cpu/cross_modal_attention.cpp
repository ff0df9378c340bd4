// cross_modal_attention on CPU.
//
// Without dropout, each sample's valid rows go to ATen's CPU flash-attention kernel (vectorised for
// the CPU it runs on, which this file, built for a baseline ISA, could not be), so padded keys and
// queries cost nothing; a batch whose rows are all valid goes in one call, without copies. Grouped heads are repeated to the
// query heads and unequal head dims zero-padded to the larger one for it. Causal attention over a
// square sample is ATen's causal kernel; any other window, and a key mask, go in chunks of query
// rows, each with only the keys its rows can see and what they may not see as an additive mask.
//
// With dropout, whose mask must be mmkern's hash (shared with the GPU kernels), a softcap or sinks
// (which ATen's kernel has not), work is split into
// (sample, kv head) groups: the Hq / Hkv query heads that read one kv head are stacked, so each
// GEMM covers the whole group (multi-query attention gets one K^T read for all its heads). Only the first kv_lens[b] keys and q_lens[b] queries of a sample are touched. Queries run
// in tiles of kQueryTile rows, which bounds the fp32 score tile at heads x kQueryTile x kv_len
// whatever Lq is; the backward recomputes each tile's probabilities from the saved log-sum-exp.
// GEMMs go to ATen's BLAS; scores, softmax and accumulation are float32 (float64 for float64).
// Groups run in parallel when there are enough of them to fill the threads; otherwise they run one
// after the other and each GEMM is multi-threaded by BLAS instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace mmkern {
namespace {

using at::Tensor;

constexpr int64_t kQueryTile = 64;
// Query rows per call of ATen's flash kernel under a window: each chunk takes only the keys its rows
// can see, so a sliding window costs about its width per row, not the whole key side.
constexpr int64_t kFlashRows = 256;

// Where each sample's rows lie. Padded tensors (B, L, H, D) give sample b as x[b], rows from 0 up
// to its length; packed ones (total, H, D) give rows [cu_seqlens[b], cu_seqlens[b + 1]) of x.
struct Layout {
  bool packed = false;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, group = 0;
  int64_t q_len = 0, k_len = 0;  // the dropout index's (Lq, Lk): the padded or the max lengths
  std::vector<int64_t> q_start, q_rows, k_start, k_rows;
  // Query i of sample b sees keys j with i + d - window_left <= j <= i + d + window_right, where
  // d = k_rows[b] - q_rows[b] (bottom-right alignment); -1 leaves a side unbounded.
  int64_t window_left = -1, window_right = -1;
  // Which keys may be seen: (B, Lk) padded, one per row of k packed; none: all.
  std::optional<Tensor> key_mask;
  double softcap = 0.0;  // > 0: scores s become softcap * tanh(s / softcap)
  // Added to the (softcapped) scores: a (B, Hq, Lq, Lk) view, broadcast dims of stride 0 (padded only).
  std::optional<Tensor> bias;

  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  // Whether some keys of a sample's range may be hidden from some of its rows.
  bool masked() const { return windowed() || key_mask.has_value(); }
  // Query heads [head0, head0 + heads) of sample b's bias over rows [row0, row0 + rows) and keys
  // [key0, key0 + keys), as (heads, rows, keys).
  Tensor bias_tile(int64_t b, int64_t head0, int64_t heads, int64_t row0, int64_t rows, int64_t key0,
                   int64_t keys) const {
    return bias->select(0, b).narrow(0, head0, heads).narrow(1, row0, rows).narrow(2, key0, keys);
  }
  // Sample b's key mask over keys [key0, key0 + keys), as (keys,) booleans.
  Tensor keys_kept(int64_t b, int64_t key0, int64_t keys) const {
    return packed ? key_mask->narrow(0, k_start[b] + key0, keys) : key_mask->select(0, b).narrow(0, key0, keys);
  }
  // Causal with every sample square: ATen's (top-left) causal flash kernel is then the same mask.
  bool square_causal() const { return window_left < 0 && window_right == 0 && q_rows == k_rows; }
  // The rows [first, end) of sample b that see at least one key.
  std::pair<int64_t, int64_t> seeing_rows(int64_t b) const {
    const int64_t d = k_rows[b] - q_rows[b];
    const int64_t first = window_right >= 0 ? std::max<int64_t>(0, -d - window_right) : 0;
    const int64_t end = window_left >= 0 ? std::min(q_rows[b], k_rows[b] - d + window_left) : q_rows[b];
    return {first, k_rows[b] > 0 ? end : first};
  }
  // Keys [first, end) of sample b that query rows [row0, row0 + rows) can see, end <= first if none,
  // within `kept`, the sample's keys from its first to its last the key mask keeps.
  std::pair<int64_t, int64_t> key_range(int64_t b, int64_t row0, int64_t rows, std::pair<int64_t, int64_t> kept) const {
    const int64_t d = k_rows[b] - q_rows[b];
    const int64_t first = window_left >= 0 ? std::max<int64_t>(0, row0 + d - window_left) : 0;
    const int64_t end = window_right >= 0 ? std::min(k_rows[b], row0 + rows + d + window_right) : k_rows[b];
    return {std::max(first, kept.first), std::min(end, kept.second)};
  }
  // Sample b's keys [first, end) from the first to the last one the key mask keeps (all without one):
  // a left-padded sample's chunks then skip its padding, as a right-padded one's skip past kv_lens.
  std::pair<int64_t, int64_t> kept_keys(int64_t b) const {
    if (!key_mask.has_value()) return {0, k_rows[b]};
    const Tensor kept = keys_kept(b, 0, k_rows[b]).nonzero();
    if (kept.size(0) == 0) return {0, 0};
    return {kept[0].item<int64_t>(), kept[-1].item<int64_t>() + 1};
  }

  Tensor sample(const Tensor& x, int64_t b) const { return packed ? x : x.select(0, b); }
  // lse is (B, Hq, Lq) padded and (Hq, total_q) packed: sample b's (Hq, rows) block.
  Tensor sample_lse(const Tensor& lse, int64_t b) const {
    return (packed ? lse : lse.select(0, b)).narrow(1, q_start[b], q_rows[b]);
  }
};

void check_heads(int64_t q_heads, int64_t kv_heads) {
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "mmkern::cross_modal_attention: Hq % Hkv != 0");
}

// The variants every form shares: the window, the key mask (its shape checked against `keys`, the
// (B, Lk) or (total_k,) the form expects) and the softcap.
void set_variants(Layout& l, int64_t window_left, int64_t window_right, const std::optional<Tensor>& key_mask,
                  at::IntArrayRef keys, double softcap) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "mmkern::cross_modal_attention: window_left and window_right must be >= -1 (-1: unbounded)");
  TORCH_CHECK(softcap >= 0, "mmkern::cross_modal_attention: softcap must be > 0, or 0 for none");
  l.window_left = window_left, l.window_right = window_right, l.softcap = softcap;
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->sizes() == keys,
                "mmkern::cross_modal_attention: key_mask must be a bool tensor of shape ", keys);
    l.key_mask = *key_mask;
  }
}

// For query rows [row0, row0 + rows) of sample b and keys [key0, key0 + keys), row by row (no index
// tensors: a chunk's mask costs one pass over it): out[i * keys + j] = seen where row i sees key j (the
// span its window leaves, then the key mask), else hidden; blind[i] (if given): whether row i sees none.
template <typename T>
void fill_visibility(const Layout& l, int64_t b, int64_t row0, int64_t rows, int64_t key0, int64_t keys, T seen,
                     T hidden, T* out, bool* blind) {
  std::vector<T> kept(keys, seen);           // the key mask's verdict on each key
  std::vector<int64_t> kept_before(keys + 1);  // how many of the first j keys it keeps
  for (int64_t j = 0; j <= keys; ++j) kept_before[j] = j;
  if (l.key_mask.has_value()) {
    const Tensor mask = l.keys_kept(b, key0, keys).contiguous();
    const bool* keep = mask.data_ptr<bool>();
    for (int64_t j = 0; j < keys; ++j) {
      kept[j] = keep[j] ? seen : hidden;
      kept_before[j + 1] = kept_before[j] + keep[j];
    }
  }
  const int64_t d = l.k_rows[b] - l.q_rows[b];
  for (int64_t i = 0; i < rows; ++i) {
    // Keys j with i + d - window_left <= j <= i + d + window_right, in the chunk's own indices.
    const int64_t diagonal = row0 + i + d - key0;
    const int64_t lo = l.window_left >= 0 ? std::clamp<int64_t>(diagonal - l.window_left, 0, keys) : 0;
    const int64_t hi = l.window_right >= 0 ? std::clamp<int64_t>(diagonal + l.window_right + 1, lo, keys) : keys;
    T* row = out + i * keys;
    std::fill(row, row + lo, hidden);
    std::copy(kept.begin() + lo, kept.begin() + hi, row + lo);
    std::fill(row + hi, row + keys, hidden);
    if (blind != nullptr) blind[i] = kept_before[hi] == kept_before[lo];
  }
}

// (rows, keys) booleans: whether query rows [row0, row0 + rows) of sample b see keys [key0, key0 + keys).
Tensor visible(const Layout& l, int64_t b, int64_t row0, int64_t rows, int64_t key0, int64_t keys) {
  Tensor seen = at::empty({rows, keys}, at::TensorOptions().dtype(at::kBool));
  fill_visibility<bool>(l, b, row0, rows, key0, keys, true, false, seen.data_ptr<bool>(), nullptr);
  return seen;
}

// The same tile as an additive (rows, keys) mask of 0 and -inf in `dtype` (float or double), and which
// of its rows see no key, (rows,) booleans.
std::pair<Tensor, Tensor> hiding_mask(const Layout& l, int64_t b, int64_t row0, int64_t rows, int64_t key0,
                                      int64_t keys, at::ScalarType dtype) {
  Tensor mask = at::empty({rows, keys}, at::TensorOptions().dtype(dtype));
  Tensor blind = at::empty({rows}, at::TensorOptions().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(dtype, "hiding_mask", [&] {
    fill_visibility<scalar_t>(l, b, row0, rows, key0, keys, scalar_t(0), -std::numeric_limits<scalar_t>::infinity(),
                              mask.data_ptr<scalar_t>(), blind.data_ptr<bool>());
  });
  return {mask, blind};
}

// Per-sample lengths, checked to lie in [0, limit] (the kernels index with them).
std::vector<int64_t> lengths(const std::optional<Tensor>& lens, int64_t batch, int64_t limit, const char* name) {
  std::vector<int64_t> out(batch, limit);
  if (!lens.has_value()) return out;
  const Tensor values = lens->to(at::kLong).contiguous();
  TORCH_CHECK(values.numel() == batch, "mmkern::cross_modal_attention: ", name, " must have one entry per sample");
  const int64_t* data = values.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(data[b] >= 0 && data[b] <= limit, "mmkern::cross_modal_attention: ", name, "[", b, "] = ", data[b],
                " is outside [0, ", limit, "]");
    out[b] = data[b];
  }
  return out;
}

Layout padded_layout(const Tensor& q, const Tensor& k, const std::optional<Tensor>& kv_lens,
                     const std::optional<Tensor>& q_lens, int64_t window_left, int64_t window_right,
                     const std::optional<Tensor>& key_mask, double softcap,
                     const std::optional<Tensor>& bias = std::nullopt) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "mmkern::cross_modal_attention: q, k, v must be 4-D");
  Layout l;
  l.batch = q.size(0), l.q_len = q.size(1), l.q_heads = q.size(2), l.k_len = k.size(1), l.kv_heads = k.size(2);
  check_heads(l.q_heads, l.kv_heads);
  l.group = l.q_heads / l.kv_heads;
  l.q_start.assign(l.batch, 0);
  l.k_start.assign(l.batch, 0);
  l.q_rows = lengths(q_lens, l.batch, l.q_len, "q_lens");
  l.k_rows = lengths(kv_lens, l.batch, l.k_len, "kv_lens");
  set_variants(l, window_left, window_right, key_mask, {l.batch, l.k_len}, softcap);
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({l.batch, l.q_heads, l.q_len, l.k_len}),
                "mmkern::cross_modal_attention: bias must be a (B, Hq, Lq, Lk) view");
    l.bias = *bias;
  }
  return l;
}

// Starts and lengths from cu_seqlens, checked to be non-decreasing, within the tensor's rows and
// within the max length.
void spans(const Tensor& cu_seqlens, int64_t total, int64_t max_len, const char* name, std::vector<int64_t>& start,
           std::vector<int64_t>& rows) {
  const Tensor values = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* data = values.const_data_ptr<int64_t>();
  const int64_t batch = values.numel() - 1;
  start.resize(batch), rows.resize(batch);
  TORCH_CHECK(data[0] >= 0, "mmkern::cross_modal_attention_packed: ", name, " must start at a row >= 0");
  for (int64_t b = 0; b < batch; ++b) {
    start[b] = data[b], rows[b] = data[b + 1] - data[b];
    TORCH_CHECK(rows[b] >= 0 && rows[b] <= max_len && data[b + 1] <= total, "mmkern::cross_modal_attention_packed: ",
                name, " must be non-decreasing, within the ", total, " rows, with steps of at most ", max_len);
  }
}

Layout packed_layout(const Tensor& q, const Tensor& k, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left, int64_t window_right,
                     const std::optional<Tensor>& key_mask, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "mmkern::cross_modal_attention_packed: q, k, v must be 3-D");
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 1,
              "mmkern::cross_modal_attention_packed: cu_seqlens_q and cu_seqlens_k must both hold batch + 1 offsets");
  Layout l;
  l.packed = true;
  l.batch = cu_seqlens_q.numel() - 1, l.q_heads = q.size(1), l.kv_heads = k.size(1);
  l.q_len = max_seqlen_q, l.k_len = max_seqlen_k;
  check_heads(l.q_heads, l.kv_heads);
  l.group = l.q_heads / l.kv_heads;
  spans(cu_seqlens_q, q.size(0), max_seqlen_q, "cu_seqlens_q", l.q_start, l.q_rows);
  spans(cu_seqlens_k, k.size(0), max_seqlen_k, "cu_seqlens_k", l.k_start, l.k_rows);
  set_variants(l, window_left, window_right, key_mask, {k.size(0)}, softcap);
  return l;
}

// The dropout hash of mmkern.reference.dropout_keep_mask: splitmix64 of the element's index in the
// (B, Hq, Lq, Lk) matrix, offset by the seed.
inline bool keep(uint64_t offset, uint64_t index, uint32_t threshold) {
  uint64_t z = index + offset;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40) >= threshold;
}

struct Dropout {
  bool active = false;
  uint64_t offset = 0;
  uint32_t threshold = 0;  // keep when the hash's top 24 bits are >= p * 2^24
  double scale = 1.0;      // 1 / (1 - p)

  Dropout(double p, const std::optional<Tensor>& seed) {
    if (p <= 0) return;
    TORCH_CHECK(seed.has_value(), "mmkern::cross_modal_attention: dropout needs a dropout_seed");
    active = true;
    const auto seed_value = static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>());
    offset = seed_value * 0xD1B54A32D192ED03ull + 0x9E3779B97F4A7C15ull;
    threshold = static_cast<uint32_t>(std::ceil(p * (1 << 24)));
    scale = 1.0 / (1.0 - p);
  }

  // (heads, rows, keys) factors 0 or 1 / (1 - p) for query heads [head0, head0 + heads) and query
  // rows [row0, row0 + rows) of sample b, keys [key0, key0 + keys).
  Tensor factors(const Layout& l, int64_t b, int64_t head0, int64_t heads, int64_t row0, int64_t rows, int64_t key0,
                 int64_t keys, at::TensorOptions options) const {
    Tensor out = at::empty({heads, rows, keys}, options.dtype(at::kDouble));
    double* data = out.data_ptr<double>();
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < rows; ++i) {
        const uint64_t base = static_cast<uint64_t>(((b * l.q_heads + head0 + h) * l.q_len + row0 + i) * l.k_len + key0);
        for (int64_t j = 0; j < keys; ++j) {
          data[(h * rows + i) * keys + j] = keep(offset, base + j, threshold) ? scale : 0.0;
        }
      }
    }
    return out.to(options.dtype());
  }
};

// Rows [row0, row0 + rows) of the query heads that read kv head `kv_head`, from one sample's
// (L, H, D) view, as (group, rows, D) in dtype `acc`.
Tensor group_rows(const Tensor& x, int64_t kv_head, int64_t group, int64_t row0, int64_t rows, at::ScalarType acc) {
  return x.narrow(0, row0, rows).narrow(1, kv_head * group, group).transpose(0, 1).to(acc);
}

// Runs fn(b, kv_head) for every group, in parallel when the groups alone can fill the threads.
// OpenMP's threads start with their own thread-local state, so each takes the caller's: fn's ATen
// calls must run below autograd, under the caller's dispatch keys and grad mode, as the caller's do.
template <typename Fn>
void for_each_group(const Layout& l, const Fn& fn) {
  const int64_t groups = l.batch * l.kv_heads;
  if (groups >= at::get_num_threads()) {
    const at::ThreadLocalState state;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t g = begin; g < end; ++g) fn(g / l.kv_heads, g % l.kv_heads);
    });
  } else {
    for (int64_t g = 0; g < groups; ++g) fn(g / l.kv_heads, g % l.kv_heads);
  }
}

at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// (N, L, H, D) -> the (N, H', L, dim) view ATen's flash kernel takes: each head repeated `group`
// times, the head dim zero-padded to `dim`.
Tensor flash_layout(const Tensor& x, int64_t group, int64_t dim) {
  Tensor y = x;
  if (group > 1) {
    y = y.unsqueeze(3).expand({y.size(0), y.size(1), y.size(2), group, y.size(3)});
    y = y.reshape({y.size(0), y.size(1), y.size(2) * group, y.size(4)});
  }
  if (y.size(3) < dim) y = at::constant_pad_nd(y, {0, dim - y.size(3)});
  return y.transpose(1, 2);
}

// (N, H', L, dim) gradients of repeated heads -> (N, L, Hkv, width), summed over each group.
Tensor fold_heads(const Tensor& grad, int64_t kv_heads, int64_t group, int64_t width) {
  const Tensor rows = grad.transpose(1, 2).narrow(3, 0, width);
  if (group == 1) return rows;
  return rows.reshape({rows.size(0), rows.size(1), kv_heads, group, width}).sum(3);
}

// Whether a padded batch has every row of every sample valid (and some work): then ATen's kernel
// takes it in one call.
bool whole_batch(const Layout& l) {
  const auto full = [](const std::vector<int64_t>& rows, int64_t len) {
    return std::all_of(rows.begin(), rows.end(), [&](int64_t n) { return n == len; });
  };
  return !l.packed && l.batch > 0 && l.q_len > 0 && l.k_len > 0 && full(l.q_rows, l.q_len) && full(l.k_rows, l.k_len) &&
         !l.key_mask.has_value() && !l.bias.has_value() && (!l.windowed() || l.square_causal());
}

std::tuple<Tensor, Tensor> flash_forward_chunk(const Layout& l, const Tensor& q, const Tensor& k, const Tensor& v,
                                               double scale, bool causal, const std::optional<Tensor>& mask) {
  const int64_t dim = std::max(q.size(-1), v.size(-1));
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      flash_layout(q, 1, dim), flash_layout(k, l.group, dim), flash_layout(v, l.group, dim), 0.0, causal, mask, scale);
  out = out.transpose(1, 2).narrow(3, 0, v.size(-1));
  // ATen's kernel drops a NaN score from its running maximum and returns a finite row for a query
  // holding NaN or inf, a silently wrong answer; eager attention (and the GPU kernels) give NaN.
  // One vectorised pass first, in the accumulation dtype (a float64 sum costs 5x a float32 one): a sum
  // of finite values is finite unless it overflows, and a NaN or inf in q makes it NaN or inf, so only
  // then are the rows looked for.
  if (std::isfinite(q.sum(accumulate_type(q.scalar_type())).item<double>())) return {out, lse};
  const Tensor poisoned_rows = at::isfinite(q).logical_not().any(-1);  // (B, L, H)
  if (poisoned_rows.any().item<bool>()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    out.masked_fill_(poisoned_rows.unsqueeze(-1), nan);
    lse.masked_fill_(poisoned_rows.transpose(1, 2), nan);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_backward_chunk(const Layout& l, const Tensor& grad_out, const Tensor& q,
                                                        const Tensor& k, const Tensor& v, const Tensor& out,
                                                        const Tensor& lse, double scale, bool causal,
                                                        const std::optional<Tensor>& mask) {
  const int64_t head_dim = q.size(-1), v_dim = v.size(-1), dim = std::max(head_dim, v_dim);
  auto [grad_q, grad_k, grad_v] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      flash_layout(grad_out, 1, dim), flash_layout(q, 1, dim), flash_layout(k, l.group, dim),
      flash_layout(v, l.group, dim), flash_layout(out, 1, dim), lse.contiguous(), 0.0, causal, mask, scale);
  return {grad_q.transpose(1, 2).narrow(3, 0, head_dim), fold_heads(grad_k, l.kv_heads, l.group, head_dim),
          fold_heads(grad_v, l.kv_heads, l.group, v_dim)};
}

// What one call of ATen's flash kernel covers: query rows [row0, row0 + rows) and keys
// [key0, key0 + keys) of sample b, with the causal flag or an additive (1, 1, rows, keys) mask, and
// then which of its rows see no key (ATen gives them zeros but lse 0, not -inf).
struct Chunk {
  int64_t b, row0, rows, key0, keys;
  bool causal;
  std::optional<Tensor> mask, blind_rows;
};

// Each sample's valid rows and keys in one chunk, causal where the window is causal over a square
// sample (ATen's top-left causal is then the same mask); under any other window, a key mask or a bias,
// chunks of kFlashRows rows that see a key, each with the keys they can see and the rest as a
// 0 / -inf mask. Rows that see no key by the window are in no chunk: they keep the zeros and -inf
// they arrived with.
template <typename Fn>
void for_each_chunk(const Layout& l, at::TensorOptions options, const Fn& fn) {
  for (int64_t b = 0; b < l.batch; ++b) {
    if (l.q_rows[b] == 0 || l.k_rows[b] == 0) continue;
    const bool square_causal = l.window_left < 0 && l.window_right == 0 && l.q_rows[b] == l.k_rows[b];
    if (!l.key_mask.has_value() && !l.bias.has_value() && (!l.windowed() || square_causal)) {
      fn(Chunk{b, 0, l.q_rows[b], 0, l.k_rows[b], square_causal, std::nullopt, std::nullopt});
      continue;
    }
    const auto [first, end] = l.seeing_rows(b);
    const auto kept = l.kept_keys(b);
    for (int64_t row0 = first; row0 < end; row0 += kFlashRows) {
      const int64_t rows = std::min(kFlashRows, end - row0);
      const auto [key0, key_end] = l.key_range(b, row0, rows, kept);
      if (key_end <= key0) continue;  // these rows see no key: zeros and -inf, as they arrived
      const int64_t keys = key_end - key0;
      // ATen takes a float32 mask for half-precision queries (float64 for float64 ones).
      const auto mask_dtype = accumulate_type(c10::typeMetaToScalarType(options.dtype()));
      const auto [hiding, blind] = hiding_mask(l, b, row0, rows, key0, keys, mask_dtype);
      if (!l.bias.has_value()) {
        fn(Chunk{b, row0, rows, key0, keys, false, hiding.view({1, 1, rows, keys}), blind});
        continue;
      }
      // The bias is the mask, per head, with the hidden keys at -inf; a row it leaves no key is blind.
      const Tensor mask = l.bias_tile(b, 0, l.q_heads, row0, rows, key0, keys).to(mask_dtype)
                              .masked_fill(at::isneginf(hiding), -INFINITY).unsqueeze(0);
      fn(Chunk{b, row0, rows, key0, keys, false, mask, at::isneginf(mask).all(-1)});
    }
  }
}

// A chunk's rows (or keys) of a sample-major tensor, as a (1, rows, H, D) view; its lse as (1, H, rows).
Tensor query_rows(const Layout& l, const Chunk& c, const Tensor& x) {
  return l.sample(x, c.b).narrow(0, l.q_start[c.b] + c.row0, c.rows).unsqueeze(0);
}
Tensor key_rows(const Layout& l, const Chunk& c, const Tensor& x) {
  return l.sample(x, c.b).narrow(0, l.k_start[c.b] + c.key0, c.keys).unsqueeze(0);
}
Tensor lse_rows(const Layout& l, const Chunk& c, const Tensor& lse) {
  return l.sample_lse(lse, c.b).narrow(1, c.row0, c.rows).unsqueeze(0);
}

void flash_forward(const Layout& l, const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
                   Tensor& lse) {
  for_each_chunk(l, q.options(), [&](const Chunk& c) {
    auto [chunk_out, chunk_lse] =
        flash_forward_chunk(l, query_rows(l, c, q), key_rows(l, c, k), key_rows(l, c, v), scale, c.causal, c.mask);
    if (c.blind_rows.has_value()) chunk_lse.masked_fill_(*c.blind_rows, -INFINITY);
    query_rows(l, c, out).copy_(chunk_out);
    lse_rows(l, c, lse).copy_(chunk_lse);
  });
}

// A log-sum-exp to subtract from scores: -inf (a row that sees no key) read as 0, so its
// probabilities come out exp(-inf) = 0 rather than NaN.
Tensor finite_lse(const Tensor& lse) { return lse.masked_fill(at::isneginf(lse), 0.0); }

// grad_k and grad_v arrive zero: chunks of one sample share keys, so their gradients add up.
void flash_backward(const Layout& l, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& out, const Tensor& lse, double scale, Tensor& grad_q, Tensor& grad_k,
                    Tensor& grad_v) {
  for_each_chunk(l, q.options(), [&](const Chunk& c) {
    auto [chunk_grad_q, chunk_grad_k, chunk_grad_v] = flash_backward_chunk(
        l, query_rows(l, c, grad_out), query_rows(l, c, q), key_rows(l, c, k), key_rows(l, c, v),
        query_rows(l, c, out), finite_lse(lse_rows(l, c, lse)), scale, c.causal, c.mask);
    query_rows(l, c, grad_q).copy_(chunk_grad_q);
    key_rows(l, c, grad_k).add_(chunk_grad_k);
    key_rows(l, c, grad_v).add_(chunk_grad_v);
  });
}

// The (G, rows, keys) scaled scores of a tile, softcapped, plus the bias, with the keys its rows do not
// see at -inf;
// and with a softcap, the slope d scores / d (scaled q.k) = 1 - tanh^2 the backward needs.
std::pair<Tensor, Tensor> tile_scores(const Layout& l, int64_t b, int64_t kv_head, int64_t row0, int64_t rows,
                                      int64_t key0, int64_t keys, const Tensor& query, const Tensor& key_t,
                                      double scale) {
  Tensor scores = at::matmul(query, key_t).mul_(scale);
  Tensor slope;
  if (l.softcap > 0) {
    scores.div_(l.softcap).tanh_();
    slope = 1 - scores * scores;
    scores.mul_(l.softcap);
  }
  if (l.bias.has_value()) scores.add_(l.bias_tile(b, kv_head * l.group, l.group, row0, rows, key0, keys));
  if (l.masked()) scores.masked_fill_(visible(l, b, row0, rows, key0, keys).logical_not(), -INFINITY);
  return {scores, slope};
}

// Fills out and lse, which arrive zero and -inf. The tiled path (dropout, whose mask must be
// mmkern's, a softcap or sinks) visits each query tile's visible keys only.
void attention_forward(const Layout& l, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                       const Dropout& dropout, const std::optional<Tensor>& sinks, Tensor& out, Tensor& lse) {
  if (!dropout.active && l.softcap == 0 && !sinks.has_value()) return flash_forward(l, q, k, v, scale, out, lse);
  const auto acc = accumulate_type(q.scalar_type());
  for_each_group(l, [&](int64_t b, int64_t kv_head) {
    const Tensor lse_b = l.sample_lse(lse, b);
    Tensor group_sinks;  // (G, 1, 1): a row that sees no key has the sink's logit as its lse
    if (sinks.has_value()) {
      group_sinks = sinks->narrow(0, kv_head * l.group, l.group).to(acc).view({l.group, 1, 1});
      lse_b.narrow(0, kv_head * l.group, l.group).copy_(group_sinks.squeeze(-1));
    }
    if (l.k_rows[b] == 0) return;
    const Tensor q_b = l.sample(q, b).narrow(0, l.q_start[b], l.q_rows[b]);
    const Tensor out_b = l.sample(out, b).narrow(0, l.q_start[b], l.q_rows[b]);
    const Tensor keys_b = l.sample(k, b).narrow(0, l.k_start[b], l.k_rows[b]).select(1, kv_head);
    const Tensor values_b = l.sample(v, b).narrow(0, l.k_start[b], l.k_rows[b]).select(1, kv_head);
    const auto kept = l.kept_keys(b);
    for (int64_t row0 = 0; row0 < l.q_rows[b]; row0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, l.q_rows[b] - row0);
      const auto [key0, key_end] = l.key_range(b, row0, rows, kept);
      if (key_end <= key0) continue;  // no row of the tile sees a key: zeros and -inf, as they arrived
      const int64_t keys = key_end - key0;
      const Tensor key_t = keys_b.narrow(0, key0, keys).to(acc).t();  // (D, keys)
      const Tensor value = values_b.narrow(0, key0, keys).to(acc);    // (keys, Dv)
      const Tensor query = group_rows(q_b, kv_head, l.group, row0, rows, acc);  // (G, rows, D)
      Tensor scores = tile_scores(l, b, kv_head, row0, rows, key0, keys, query, key_t, scale).first;  // (G, rows, keys)
      Tensor tile_lse = at::logsumexp(scores, -1, /*keepdim=*/true);
      if (group_sinks.defined()) tile_lse = at::logaddexp(tile_lse, group_sinks);
      Tensor probs = scores.sub_(finite_lse(tile_lse)).exp_();
      if (dropout.active) {
        probs.mul_(dropout.factors(l, b, kv_head * l.group, l.group, row0, rows, key0, keys, probs.options()));
      }
      const Tensor tile_out = at::matmul(probs, value);  // (G, rows, Dv)
      out_b.narrow(0, row0, rows).narrow(1, kv_head * l.group, l.group).copy_(tile_out.transpose(0, 1));
      lse_b.narrow(0, kv_head * l.group, l.group).narrow(1, row0, rows).copy_(tile_lse.squeeze(-1));
    }
  });
}

// Fills grad_q, grad_k, grad_v, which arrive zero.
// grad_bias, where defined, is (B, Hq, Lq, Lk) zeros.
void attention_backward(const Layout& l, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, double scale, const Dropout& dropout, Tensor& grad_q,
                        Tensor& grad_k, Tensor& grad_v, Tensor grad_bias = Tensor()) {
  // The lse holds any sinks, so ATen's kernel, which recomputes the probabilities from it, serves them;
  // it gives no gradient of its mask, the bias.
  if (!dropout.active && l.softcap == 0 && !grad_bias.defined()) {
    return flash_backward(l, grad_out, q, k, v, out, lse, scale, grad_q, grad_k, grad_v);
  }
  const auto acc = accumulate_type(q.scalar_type());
  for_each_group(l, [&](int64_t b, int64_t kv_head) {
    if (l.k_rows[b] == 0 || l.q_rows[b] == 0) return;
    const auto rows_of = [&](const Tensor& x) { return l.sample(x, b).narrow(0, l.q_start[b], l.q_rows[b]); };
    const auto keys_of = [&](const Tensor& x) {
      return l.sample(x, b).narrow(0, l.k_start[b], l.k_rows[b]).select(1, kv_head);
    };
    const Tensor q_b = rows_of(q), grad_out_b = rows_of(grad_out), out_b = rows_of(out), grad_q_b = rows_of(grad_q);
    const Tensor lse_b = l.sample_lse(lse, b);
    const Tensor key = keys_of(k).to(acc);      // (keys, D)
    const Tensor value = keys_of(v).to(acc);    // (keys, Dv)
    Tensor grad_key = at::zeros_like(key);
    Tensor grad_value = at::zeros_like(value);
    const auto kept = l.kept_keys(b);
    for (int64_t row0 = 0; row0 < l.q_rows[b]; row0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, l.q_rows[b] - row0);
      const auto [key0, key_end] = l.key_range(b, row0, rows, kept);
      if (key_end <= key0) continue;
      const int64_t keys = key_end - key0;
      const Tensor tile_key = key.narrow(0, key0, keys), tile_value = value.narrow(0, key0, keys);
      const Tensor query = group_rows(q_b, kv_head, l.group, row0, rows, acc);          // (G, rows, D)
      const Tensor d_out = group_rows(grad_out_b, kv_head, l.group, row0, rows, acc);   // (G, rows, Dv)
      const Tensor output = group_rows(out_b, kv_head, l.group, row0, rows, acc);
      const Tensor tile_lse = lse_b.narrow(0, kv_head * l.group, l.group).narrow(1, row0, rows).to(acc).unsqueeze(-1);
      auto [scores, slope] =
          tile_scores(l, b, kv_head, row0, rows, key0, keys, query, tile_key.t(), scale);  // (G, rows, keys)
      const Tensor probs = scores.sub_(finite_lse(tile_lse)).exp_();
      Tensor d_probs = at::matmul(d_out, tile_value.t());
      Tensor kept = probs;
      if (dropout.active) {
        const Tensor factors =
            dropout.factors(l, b, kv_head * l.group, l.group, row0, rows, key0, keys, probs.options());
        kept = probs * factors;
        d_probs.mul_(factors);
      }
      // d scores = P * (dP - rowsum(dO * O)); rowsum(dO * O) = rowsum(P * dP), dropout included.
      const Tensor delta = (d_out * output).sum(-1, /*keepdim=*/true);
      // The gradient of the scores after the softcap (the bias's own), then of the scaled q.k.
      const Tensor d_capped = d_probs.sub_(delta).mul_(probs);
      if (grad_bias.defined()) {
        grad_bias.select(0, b).narrow(0, kv_head * l.group, l.group).narrow(1, row0, rows).narrow(2, key0, keys)
            .copy_(d_capped);
      }
      Tensor d_scores = d_capped * scale;
      if (slope.defined()) d_scores.mul_(slope);
      grad_value.narrow(0, key0, keys).add_(at::matmul(kept.transpose(1, 2), d_out).sum(0));
      grad_key.narrow(0, key0, keys).add_(at::matmul(d_scores.transpose(1, 2), query).sum(0));
      grad_q_b.narrow(0, row0, rows).narrow(1, kv_head * l.group, l.group)
          .copy_(at::matmul(d_scores, tile_key).transpose(0, 1));
    }
    keys_of(grad_k).copy_(grad_key);
    keys_of(grad_v).copy_(grad_value);
  });
}

void check_sinks(const std::optional<Tensor>& sinks, int64_t q_heads) {
  TORCH_CHECK(!sinks.has_value() || (sinks->dim() == 1 && sinks->size(0) == q_heads),
              "mmkern::cross_modal_attention: sinks must hold one logit per query head (", q_heads, ")");
}

Tensor empty_lse(const Tensor& q, at::IntArrayRef shape) {
  return at::full(shape, -std::numeric_limits<double>::infinity(), q.options().dtype(accumulate_type(q.scalar_type())));
}

// Rows no work reaches (past q_lens, or of samples without keys) stay zero, with lse = -inf.
std::tuple<Tensor, Tensor> cross_modal_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const std::optional<Tensor>& kv_lens,
                                                     const std::optional<Tensor>& q_lens, double scale,
                                                     double dropout_p, const std::optional<Tensor>& dropout_seed,
                                                     int64_t window_left, int64_t window_right,
                                                     const std::optional<Tensor>& key_mask, double softcap,
                                                     const std::optional<Tensor>& sinks,
                                                     const std::optional<Tensor>& bias) {
  const Layout l = padded_layout(q, k, kv_lens, q_lens, window_left, window_right, key_mask, softcap, bias);
  check_sinks(sinks, l.q_heads);
  const Dropout dropout(dropout_p, dropout_seed);
  if (!dropout.active && softcap == 0 && !sinks.has_value() && whole_batch(l)) {
    // ATen's lse is (B, H, L) over (B, L, H) storage: contiguous, as the fake kernel promises.
    auto [out, lse] = flash_forward_chunk(l, q, k, v, scale, l.windowed(), std::nullopt);
    return {out.contiguous(), lse.contiguous()};
  }
  Tensor out = at::zeros({l.batch, l.q_len, l.q_heads, v.size(3)}, q.options());
  Tensor lse = empty_lse(q, {l.batch, l.q_heads, l.q_len});
  attention_forward(l, q, k, v, scale, dropout, sinks, out, lse);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_modal_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& kv_lens, const std::optional<Tensor>& q_lens, double scale, double dropout_p,
    const std::optional<Tensor>& dropout_seed, int64_t window_left, int64_t window_right,
    const std::optional<Tensor>& key_mask, double softcap, const std::optional<Tensor>& bias, bool bias_grad) {
  const Layout l = padded_layout(q, k, kv_lens, q_lens, window_left, window_right, key_mask, softcap, bias);
  TORCH_CHECK(!bias_grad || bias.has_value(), "mmkern::cross_modal_attention_backward: bias_grad needs a bias");
  const Dropout dropout(dropout_p, dropout_seed);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  Tensor grad_bias = at::zeros(bias_grad ? at::IntArrayRef({l.batch, l.q_heads, l.q_len, l.k_len}) : at::IntArrayRef({0}),
                               acc);
  if (!dropout.active && softcap == 0 && whole_batch(l)) {
    auto [grad_q, grad_k, grad_v] = flash_backward_chunk(l, grad_out, q, k, v, out, lse, scale, l.windowed(),
                                                          std::nullopt);
    return {grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), grad_bias};
  }
  Tensor grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);
  Tensor grad_k = at::zeros_like(k, at::MemoryFormat::Contiguous);
  Tensor grad_v = at::zeros_like(v, at::MemoryFormat::Contiguous);
  attention_backward(l, grad_out, q, k, v, out, lse, scale, dropout, grad_q, grad_k, grad_v,
                     bias_grad ? grad_bias : Tensor());
  return {grad_q, grad_k, grad_v, grad_bias};
}

std::tuple<Tensor, Tensor> cross_modal_attention_packed_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                            int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                                            double dropout_p,
                                                            const std::optional<Tensor>& dropout_seed,
                                                            int64_t window_left, int64_t window_right,
                                                            const std::optional<Tensor>& key_mask, double softcap,
                                                            const std::optional<Tensor>& sinks) {
  const Layout l = packed_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                 window_right, key_mask, softcap);
  check_sinks(sinks, l.q_heads);
  Tensor out = at::zeros({q.size(0), l.q_heads, v.size(2)}, q.options());
  Tensor lse = empty_lse(q, {l.q_heads, q.size(0)});
  attention_forward(l, q, k, v, scale, Dropout(dropout_p, dropout_seed), sinks, out, lse);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_modal_attention_packed_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    double dropout_p, const std::optional<Tensor>& dropout_seed, int64_t window_left, int64_t window_right,
    const std::optional<Tensor>& key_mask, double softcap) {
  const Layout l = packed_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                 window_right, key_mask, softcap);
  Tensor grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);
  Tensor grad_k = at::zeros_like(k, at::MemoryFormat::Contiguous);
  Tensor grad_v = at::zeros_like(v, at::MemoryFormat::Contiguous);
  attention_backward(l, grad_out, q, k, v, out, lse, scale, Dropout(dropout_p, dropout_seed), grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) {
  m.impl("cross_modal_attention", &cross_modal_attention_cpu);
  m.impl("cross_modal_attention_backward", &cross_modal_attention_backward_cpu);
  m.impl("cross_modal_attention_packed", &cross_modal_attention_packed_cpu);
  m.impl("cross_modal_attention_packed_backward", &cross_modal_attention_packed_backward_cpu);
}

}  // namespace mmkern
