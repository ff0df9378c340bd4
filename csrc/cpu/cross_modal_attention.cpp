// cross_modal_attention on CPU.
//
// Work is split into (sample, kv head) groups: the Hq / Hkv query heads that read one kv head are
// stacked, so each GEMM covers the whole group (multi-query attention gets one K^T read for all its
// heads). Only the first kv_lens[b] keys and q_lens[b] queries of a sample are touched. Queries run
// in tiles of kQueryTile rows, which bounds the fp32 score tile at heads x kQueryTile x kv_len
// whatever Lq is; the backward recomputes each tile's probabilities from the saved log-sum-exp.
// GEMMs go to ATen's BLAS; scores, softmax and accumulation are float32 (float64 for float64).
// Groups run in parallel when there are enough of them to fill the threads; otherwise they run one
// after the other and each GEMM is multi-threaded by BLAS instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

struct Shape {
  int64_t batch, q_len, q_heads, head_dim, k_len, kv_heads, v_dim, group;
};

Shape shape_of(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mmkern::cross_modal_attention: q, k, v must be 4-D");
  Shape s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), v.size(3), 0};
  TORCH_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, "mmkern::cross_modal_attention: Hq % Hkv != 0");
  s.group = s.q_heads / s.kv_heads;
  return s;
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
  // rows [row0, row0 + rows) of sample b, keys [0, keys).
  Tensor factors(const Shape& s, int64_t b, int64_t head0, int64_t heads, int64_t row0, int64_t rows, int64_t keys,
                 at::TensorOptions options) const {
    Tensor out = at::empty({heads, rows, keys}, options.dtype(at::kDouble));
    double* data = out.data_ptr<double>();
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < rows; ++i) {
        const uint64_t base = static_cast<uint64_t>(((b * s.q_heads + head0 + h) * s.q_len + row0 + i) * s.k_len);
        for (int64_t j = 0; j < keys; ++j) {
          data[(h * rows + i) * keys + j] = keep(offset, base + j, threshold) ? scale : 0.0;
        }
      }
    }
    return out.to(options.dtype());
  }
};

// Rows [row0, row0 + rows) of the heads of kv head `kv_head` in sample b of x (B, L, H, D), as
// (group, rows, D) in dtype `acc`.
Tensor group_rows(const Tensor& x, int64_t b, int64_t kv_head, int64_t group, int64_t row0, int64_t rows,
                  at::ScalarType acc) {
  return x.select(0, b).narrow(0, row0, rows).narrow(1, kv_head * group, group).transpose(0, 1).to(acc);
}

// Runs fn(b, kv_head) for every group, in parallel when the groups alone can fill the threads.
template <typename Fn>
void for_each_group(const Shape& s, const Fn& fn) {
  const int64_t groups = s.batch * s.kv_heads;
  if (groups >= at::get_num_threads()) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) fn(g / s.kv_heads, g % s.kv_heads);
    });
  } else {
    for (int64_t g = 0; g < groups; ++g) fn(g / s.kv_heads, g % s.kv_heads);
  }
}

at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor> cross_modal_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const std::optional<Tensor>& kv_lens,
                                                     const std::optional<Tensor>& q_lens, double scale,
                                                     double dropout_p, const std::optional<Tensor>& dropout_seed) {
  const Shape s = shape_of(q, k, v);
  const auto acc = accumulate_type(q.scalar_type());
  const auto kv_len = lengths(kv_lens, s.batch, s.k_len, "kv_lens");
  const auto q_valid = lengths(q_lens, s.batch, s.q_len, "q_lens");
  const Dropout dropout(dropout_p, dropout_seed);

  // Rows no work reaches (past q_lens, or of samples without keys) stay zero, with lse = -inf.
  Tensor out = at::zeros({s.batch, s.q_len, s.q_heads, s.v_dim}, q.options());
  Tensor lse = at::full({s.batch, s.q_heads, s.q_len}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc));

  for_each_group(s, [&](int64_t b, int64_t kv_head) {
    const int64_t keys = kv_len[b];
    if (keys == 0) return;
    const Tensor key_t = k.select(0, b).narrow(0, 0, keys).select(1, kv_head).to(acc).t();  // (D, keys)
    const Tensor value = v.select(0, b).narrow(0, 0, keys).select(1, kv_head).to(acc);      // (keys, Dv)
    for (int64_t row0 = 0; row0 < q_valid[b]; row0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, q_valid[b] - row0);
      const Tensor query = group_rows(q, b, kv_head, s.group, row0, rows, acc);  // (G, rows, D)
      Tensor scores = at::matmul(query, key_t).mul_(scale);                     // (G, rows, keys)
      const Tensor tile_lse = at::logsumexp(scores, -1, /*keepdim=*/true);
      Tensor probs = scores.sub_(tile_lse).exp_();
      if (dropout.active) {
        probs.mul_(dropout.factors(s, b, kv_head * s.group, s.group, row0, rows, keys, probs.options()));
      }
      const Tensor tile_out = at::matmul(probs, value);  // (G, rows, Dv)
      out.select(0, b).narrow(0, row0, rows).narrow(1, kv_head * s.group, s.group).copy_(tile_out.transpose(0, 1));
      lse.select(0, b).narrow(0, kv_head * s.group, s.group).narrow(1, row0, rows).copy_(tile_lse.squeeze(-1));
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_modal_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& kv_lens, const std::optional<Tensor>& q_lens, double scale, double dropout_p,
    const std::optional<Tensor>& dropout_seed) {
  const Shape s = shape_of(q, k, v);
  const auto acc = accumulate_type(q.scalar_type());
  const auto kv_len = lengths(kv_lens, s.batch, s.k_len, "kv_lens");
  const auto q_valid = lengths(q_lens, s.batch, s.q_len, "q_lens");
  const Dropout dropout(dropout_p, dropout_seed);

  Tensor grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);
  Tensor grad_k = at::zeros_like(k, at::MemoryFormat::Contiguous);
  Tensor grad_v = at::zeros_like(v, at::MemoryFormat::Contiguous);

  for_each_group(s, [&](int64_t b, int64_t kv_head) {
    const int64_t keys = kv_len[b];
    if (keys == 0 || q_valid[b] == 0) return;
    const Tensor key = k.select(0, b).narrow(0, 0, keys).select(1, kv_head).to(acc);      // (keys, D)
    const Tensor value = v.select(0, b).narrow(0, 0, keys).select(1, kv_head).to(acc);    // (keys, Dv)
    Tensor grad_key = at::zeros_like(key);
    Tensor grad_value = at::zeros_like(value);
    for (int64_t row0 = 0; row0 < q_valid[b]; row0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, q_valid[b] - row0);
      const Tensor query = group_rows(q, b, kv_head, s.group, row0, rows, acc);         // (G, rows, D)
      const Tensor d_out = group_rows(grad_out, b, kv_head, s.group, row0, rows, acc);  // (G, rows, Dv)
      const Tensor output = group_rows(out, b, kv_head, s.group, row0, rows, acc);
      const Tensor tile_lse =
          lse.select(0, b).narrow(0, kv_head * s.group, s.group).narrow(1, row0, rows).to(acc).unsqueeze(-1);
      const Tensor probs = at::matmul(query, key.t()).mul_(scale).sub_(tile_lse).exp_();  // (G, rows, keys)
      Tensor d_probs = at::matmul(d_out, value.t());
      Tensor kept = probs;
      if (dropout.active) {
        const Tensor factors = dropout.factors(s, b, kv_head * s.group, s.group, row0, rows, keys, probs.options());
        kept = probs * factors;
        d_probs.mul_(factors);
      }
      // d scores = P * (dP - rowsum(dO * O)); rowsum(dO * O) = rowsum(P * dP), dropout included.
      const Tensor delta = (d_out * output).sum(-1, /*keepdim=*/true);
      const Tensor d_scores = d_probs.sub_(delta).mul_(probs).mul_(scale);
      grad_value.add_(at::matmul(kept.transpose(1, 2), d_out).sum(0));
      grad_key.add_(at::matmul(d_scores.transpose(1, 2), query).sum(0));
      grad_q.select(0, b).narrow(0, row0, rows).narrow(1, kv_head * s.group, s.group)
          .copy_(at::matmul(d_scores, key).transpose(0, 1));
    }
    grad_k.select(0, b).narrow(0, 0, keys).select(1, kv_head).copy_(grad_key);
    grad_v.select(0, b).narrow(0, 0, keys).select(1, kv_head).copy_(grad_value);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) {
  m.impl("cross_modal_attention", &cross_modal_attention_cpu);
  m.impl("cross_modal_attention_backward", &cross_modal_attention_backward_cpu);
}

}  // namespace mmkern
