// The row work of the chunked linear cross-entropy on the CPU, fused: one call per [rows, L] logits
// block turns the block's logits z into the per-row statistics and, in place, into d z.
//
// The torch path (ops/_torch_linear_ce.py) otherwise runs 5 to 9 elementwise torch ops over the block
// (max, subtract, exp, sum, E_p[z], the gradient terms), each one a pass through memory: a block of
// a few hundred rows at V = 32k is tens of MB, far larger than the caches. Here each row is handled
// while it sits in the core's L2 (a 32k-float row is 128 KB): the block crosses memory once, read and
// written back as d z, and exp is taken once per logit (kept in a per-thread row buffer).
//
// Per row t with logits z (L entries, target column y or -1 when the target is not in the block):
//   shift given (lse known, +inf on ignored rows): e = exp(z − shift), total = 1
//   else: m = max z, e = exp(z − m), total = Σ e;  lse = m + log total
//   zy = z_y (0 when y = −1),  ez = Σ e z / total  (E_p[z]; only when asked)
//   with coefficients: a = (a0 + a1 · ez) / total, b = b / total, then
//   d z = e (a + b z), and d z_y −= c.
// The sums run in the compute dtype per vector lane over pieces of kSumPiece entries, and the pieces
// add up in double, so their error stays at the level of torch's cascade sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr int64_t kSumPiece = 1024;  // entries summed in the compute dtype before adding into double

template <typename T>
T lane_sum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
T lane_max(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = buf[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) s = std::max(s, buf[i]);
  return s;
}

template <typename T>
T row_max(const T* __restrict z, int64_t len) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  T best = -std::numeric_limits<T>::infinity();
  if (len >= W) {
    Vec acc = Vec::loadu(z);
    for (i = W; i + W <= len; i += W) acc = at::vec::maximum(acc, Vec::loadu(z + i));
    best = lane_max(acc);
  }
  for (; i < len; ++i) best = std::isnan(z[i]) || z[i] > best ? z[i] : best;  // NaN propagates like torch's amax
  return best;
}

// e = exp(z − shift) into `e`; returns (Σ e, Σ e z) (the second only when want_ez).
template <typename T>
std::pair<double, double> exp_row(const T* __restrict z, T* __restrict e, int64_t len, T shift, bool want_ez) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift);
  double total = 0, total_ez = 0;
  for (int64_t p = 0; p < len; p += kSumPiece) {
    const int64_t stop = std::min(len, p + kSumPiece);
    Vec acc(T(0)), acc_ez(T(0));
    int64_t i = p;
    for (; i + W <= stop; i += W) {
      const Vec zv = Vec::loadu(z + i);
      const Vec ev = (zv - vshift).exp();
      ev.store(e + i);
      acc = acc + ev;
      if (want_ez) acc_ez = acc_ez + ev * zv;
    }
    T tail = 0, tail_ez = 0;
    for (; i < stop; ++i) {
      const T ev = std::exp(z[i] - shift);
      e[i] = ev;
      tail += ev;
      tail_ez += ev * z[i];
    }
    total += double(lane_sum(acc)) + double(tail);
    if (want_ez) total_ez += double(lane_sum(acc_ez)) + double(tail_ez);
  }
  return {total, total_ez};
}

// z ← e (a + b z) (b == 0: z ← e a).
template <typename T>
void grad_row(T* __restrict z, const T* __restrict e, int64_t len, T a, T b) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a), vb(b);
  int64_t i = 0;
  if (b == T(0)) {
    for (; i + W <= len; i += W) (Vec::loadu(e + i) * va).store(z + i);
    for (; i < len; ++i) z[i] = e[i] * a;
  } else {
    for (; i + W <= len; i += W) (Vec::loadu(e + i) * (va + vb * Vec::loadu(z + i))).store(z + i);
    for (; i < len; ++i) z[i] = e[i] * (a + b * z[i]);
  }
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t rows, const at::Tensor& z) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, name, " must be a [", rows, "] vector, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " must have the logits' dtype ", z.scalar_type());
  TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), name, " must be a contiguous CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_rows_cpu(
    at::Tensor z, const at::Tensor& target, const c10::optional<at::Tensor>& shift, bool want_ez,
    const c10::optional<at::Tensor>& a0, const c10::optional<at::Tensor>& a1, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& c) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), "z must be a contiguous [rows, L] tensor");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "z must be float32 or float64");
  const int64_t rows = z.size(0), len = z.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              "target must be a contiguous int64 [rows] vector");
  check_vector(shift, "shift", rows, z);
  check_vector(a0, "a0", rows, z);
  check_vector(a1, "a1", rows, z);
  check_vector(b, "b", rows, z);
  check_vector(c, "c", rows, z);
  const bool grad = c.has_value();
  TORCH_CHECK(!grad || a0.has_value(), "a0 is needed with c");
  TORCH_CHECK(!a1.has_value() || want_ez, "a1 (a term in E_p[z]) needs want_ez");
  auto lse = at::empty({rows}, z.options());
  auto zy = at::empty({rows}, z.options());
  auto ez = at::zeros({rows}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ce_rows_", [&] {
    using T = scalar_t;
    T* zp = z.data_ptr<T>();
    const int64_t* yp = target.data_ptr<int64_t>();
    const T *sp = data_or_null<T>(shift), *a0p = data_or_null<T>(a0), *a1p = data_or_null<T>(a1),
            *bp = data_or_null<T>(b), *cp = data_or_null<T>(c);
    T *lp = lse.data_ptr<T>(), *zyp = zy.data_ptr<T>(), *ezp = ez.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> e(len);  // this thread's exp row: stays in L2 with the row it came from
      for (int64_t r = begin; r < end; ++r) {
        T* row = zp + r * len;
        const int64_t y = yp[r];
        TORCH_CHECK(y >= -1 && y < len, "target column ", y, " out of range [-1, ", len, ")");
        zyp[r] = y >= 0 ? row[y] : T(0);
        const T shift_r = sp ? sp[r] : row_max(row, len);
        // A given shift of +inf (an ignored row) means p = 0 whatever the logits: no exp(inf − inf) = NaN.
        const bool ignored = sp && shift_r == std::numeric_limits<T>::infinity();
        std::pair<double, double> sums{0.0, 0.0};
        if (ignored) std::fill(e.begin(), e.end(), T(0));
        else sums = exp_row(row, e.data(), len, shift_r, want_ez);
        T inv_total = T(1);
        if (sp) {
          lp[r] = shift_r;
          if (want_ez) ezp[r] = T(sums.second);
        } else {
          lp[r] = T(double(shift_r) + std::log(sums.first));
          inv_total = T(1.0 / sums.first);
          if (want_ez) ezp[r] = T(sums.second / sums.first);
        }
        if (!grad) continue;
        T a = a0p[r];
        if (a1p) a = a + a1p[r] * ezp[r];
        const T bb = bp ? bp[r] * inv_total : T(0);
        grad_row(row, e.data(), len, a * inv_total, bb);
        if (y >= 0) row[y] -= cp[r];
      }
    });
  });
  return {lse, zy, ez};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(unlearn_fast, m) {
  m.def("ce_rows_(Tensor(a!) z, Tensor target, Tensor? shift, bool want_ez, Tensor? a0, Tensor? a1, Tensor? b, "
        "Tensor? c) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) { m.impl("ce_rows_", &ce_rows_cpu); }
