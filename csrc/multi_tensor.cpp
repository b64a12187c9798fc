// Multi-tensor ops of unlearn_fast: global L2 norm, SAM perturb with backup, exact restore,
// finite-difference Hessian-vector accumulate-and-restore, and a fused AdamW update.
//
// Every op takes whole lists of tensors and makes ONE pass over them: the lists are cut into
// pieces of at most kPiece elements and at::parallel_for walks the pieces, so a list of 300
// tensors is one parallel loop, not 300 dispatches. Arithmetic is in the "opmath" type (fp32 for
// fp16/bf16/fp32 storage, fp64 for fp64) with one rounding to the storage type at the end.
//
// The loops use at::vec::Vectorized at the width the extension is built for (ops/_cpp.py passes
// the host's AVX2 / AVX-512 flags and the matching CPU_CAPABILITY, the same vector code torch's
// own kernels run on this machine) and restrict pointers. These ops are pure memory traffic, so
// two more things matter: perturb reads θ and g once and writes θ and the backup in the same pass;
// and a buffer that is only written (the SAM backup, θ in the restore, θ in the update that starts
// from the backup) is written with non-temporal stores when the list is larger than the caches,
// which saves the read-for-ownership a normal store costs. The operations and their order are
// those of the foreach path (ops/multi_tensor.py), built with -ffp-contract=off, so the roundings
// are the same.
// This file holds the schemas (TORCH_LIBRARY) and the CPU kernels; multi_tensor_cuda.cu holds the
// CUDA kernels of the same ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr int64_t kPiece = 1 << 16;  // elements per unit of parallel work
// Lists smaller than this stay in the caches between ops: normal stores are better there.
int64_t stream_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("UNLEARN_FAST_STREAM_BYTES");
    return e ? std::atoll(e) : (int64_t(16) << 20);
  }();
  return v;
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kVecBytes = 64;
const char* kCapability = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kVecBytes = 32;
const char* kCapability = "avx2";
#else
constexpr int64_t kVecBytes = 32;
const char* kCapability = "default";
#endif

struct Piece {
  int64_t tensor, begin, end;
};

std::vector<Piece> pieces_of(at::TensorList ts) {
  std::vector<Piece> out;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i)
    for (int64_t b = 0; b < ts[i].numel(); b += kPiece) out.push_back({i, b, std::min(b + kPiece, ts[i].numel())});
  return out;
}

int64_t bytes_of(at::TensorList ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel() * t.element_size();
  return n;
}

// Same length, same shape, same dtype as `like`, contiguous, on the CPU.
void check_matching(const char* name, at::TensorList ts, at::TensorList like, bool same_dtype = true) {
  TORCH_CHECK(ts.size() == like.size(), name, ": expected ", like.size(), " tensors, got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].is_contiguous() && ts[i].device().is_cpu(), name, "[", i, "] must be a contiguous CPU tensor");
    TORCH_CHECK(ts[i].numel() == like[i].numel(), name, "[", i, "] has ", ts[i].numel(), " elements, expected ",
                like[i].numel());
    TORCH_CHECK(!same_dtype || ts[i].scalar_type() == like[i].scalar_type(), name, "[", i, "] has dtype ",
                ts[i].scalar_type(), ", expected ", like[i].scalar_type());
  }
}

// -- vector helpers: one block of Vectorized<T>::size() elements, as opmath vectors ---------------
//
// For fp32/fp64 a block is one vector; for bf16/fp16 it is one storage vector = two fp32 vectors.

template <typename T>
constexpr bool kReduced = at::is_reduced_floating_point_v<T>;

template <typename T>
using Opmath = Vectorized<at::opmath_type<T>>;

template <typename T>
struct Block {
  Opmath<T> lo, hi;  // hi unused for fp32/fp64
};

template <typename T>
inline Block<T> to_block(const Vectorized<T>& v) {
  if constexpr (kReduced<T>) {
    auto [a, b] = at::vec::convert_to_float<T>(v);
    return {a, b};
  } else {
    return {v, Opmath<T>()};
  }
}

template <typename T>
inline Block<T> load_block(const T* p) {
  return to_block(Vectorized<T>::loadu(p));
}

template <typename T>
inline Vectorized<T> to_storage(const Block<T>& x) {
  if constexpr (kReduced<T>) {
    return at::vec::convert_from_float<T>(x.lo, x.hi);
  } else {
    return x.lo;
  }
}

// Store one storage vector; `stream` (dst aligned to kVecBytes) writes around the caches.
template <typename T>
inline void store(T* dst, const Vectorized<T>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(sizeof(Vectorized<T>) == 64, "one AVX-512 register per block");
  if (stream) {
    __m512i x;
    std::memcpy(&x, &v, 64);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), x);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(sizeof(Vectorized<T>) == 32, "one AVX2 register per block");
  if (stream) {
    __m256i x;
    std::memcpy(&x, &v, 32);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), x);
    return;
  }
#endif
  (void)stream;
  v.store(dst);
}

inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
#endif
  (void)stream;
}

// Elements before `dst` is aligned for streaming stores (0 when not streaming).
template <typename T>
inline int64_t head_until_aligned(const T* dst, int64_t n, bool stream) {
  if (!stream) return 0;
  const auto addr = reinterpret_cast<std::uintptr_t>(dst);
  if (addr % sizeof(T) != 0) return n;  // cannot align: all scalar
  const int64_t off = static_cast<int64_t>((kVecBytes - addr % kVecBytes) % kVecBytes) / sizeof(T);
  return std::min(off, n);
}

// -- squared norm ---------------------------------------------------------------------------------

template <typename T, bool Weighted>
double sum_of_squares(const T* __restrict__ x, const T* __restrict__ w, int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t W = Vectorized<T>::size();
  // four independent accumulators hide the add latency
  Opmath<T> acc[4] = {Opmath<T>(0), Opmath<T>(0), Opmath<T>(0), Opmath<T>(0)};
  int64_t i = 0;
  auto add = [&](Opmath<T>& a, Opmath<T> v, Opmath<T> wv) {
    if (Weighted) v = v * wv.abs();
    a = a + v * v;
  };
  for (; i + 2 * W <= n; i += 2 * W) {
    Block<T> a = load_block(x + i), b = load_block(x + i + W);
    Block<T> wa = Weighted ? load_block(w + i) : Block<T>{}, wb = Weighted ? load_block(w + i + W) : Block<T>{};
    add(acc[0], a.lo, wa.lo);
    add(acc[1], b.lo, wb.lo);
    if constexpr (kReduced<T>) {
      add(acc[2], a.hi, wa.hi);
      add(acc[3], b.hi, wb.hi);
    }
  }
  acc_t lanes[Opmath<T>::size()];
  ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes);
  double total = 0;
  for (int64_t j = 0; j < Opmath<T>::size(); ++j) total += lanes[j];
  for (; i < n; ++i) {
    double v = static_cast<double>(x[i]);
    if (Weighted) v *= std::abs(static_cast<double>(w[i]));
    total += v * v;
  }
  return total;
}

// Σ‖w⊙t‖² over the list (fp32 scalar; summed in fp64 across pieces) and optionally per tensor.
std::tuple<at::Tensor, at::Tensor> squared_norm_cpu(at::TensorList tensors, at::TensorList weights, bool per_tensor) {
  check_matching("tensors", tensors, tensors);
  const bool weighted = !weights.empty();
  if (weighted) check_matching("weights", weights, tensors);
  auto pieces = pieces_of(tensors);
  std::vector<double> partial(pieces.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const at::Tensor& t = tensors[pc.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "squared_norm", [&] {
        const scalar_t* x = t.const_data_ptr<scalar_t>() + pc.begin;
        const int64_t n = pc.end - pc.begin;
        partial[k] = weighted ? sum_of_squares<scalar_t, true>(x, weights[pc.tensor].const_data_ptr<scalar_t>() + pc.begin, n)
                              : sum_of_squares<scalar_t, false>(x, nullptr, n);
      });
    }
  });
  // Fixed summation order: the result does not depend on the thread count.
  std::vector<double> by_tensor(tensors.size(), 0.0);
  double total = 0;
  for (size_t k = 0; k < pieces.size(); ++k) {
    by_tensor[pieces[k].tensor] += partial[k];
    total += partial[k];
  }
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor total_t = at::scalar_tensor(total, f32);
  at::Tensor per = at::empty({per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, f32);
  float* per_data = per.data_ptr<float>();
  for (int64_t i = 0; i < per.numel(); ++i) per_data[i] = static_cast<float>(by_tensor[i]);
  return {total_t, per};
}

// -- perturb --------------------------------------------------------------------------------------

// One element of the perturbation, the foreach path's operations in its order.
template <typename T>
inline T perturbed(T old, T grad, at::opmath_type<T> sc, bool adaptive) {
  using acc_t = at::opmath_type<T>;
  const acc_t theta = static_cast<acc_t>(old);
  acc_t step = static_cast<acc_t>(grad);
  if (adaptive) step = step * (theta * theta);
  step = step * sc;
  return static_cast<T>(step + theta);
}

template <typename T>
inline Opmath<T> perturbed_vec(Opmath<T> theta, Opmath<T> step, Opmath<T> sc, bool adaptive) {
  if (adaptive) step = step * (theta * theta);
  step = step * sc;
  return step + theta;
}

// out ← p + s·w⊙g, and b ← p when b is given.  out may be p (moved in place) or g (the direction's
// storage receives the moved weights: the exchange path), and b may be g (the direction's storage keeps θ);
// so every element of p and g is read before anything is written over it.  `streamed` is the one
// destination that is only written (b, or out when it is a separate buffer): non-temporal stores go there.
template <typename T>
void perturb_range(const T* p, const T* g, T* out, T* b, int64_t n, at::opmath_type<T> s, bool adaptive,
                   const T* streamed) {
  constexpr int64_t W = Vectorized<T>::size();
  const bool stream_b = b != nullptr && b == streamed, stream_out = out == streamed;
  const int64_t head = head_until_aligned(streamed, n, streamed != nullptr);
  for (int64_t i = 0; i < head; ++i) {
    const T old = p[i], step = g[i];
    if (b) b[i] = old;
    out[i] = perturbed(old, step, s, adaptive);
  }
  const Opmath<T> sv(s);
  int64_t i = head;
  for (; i + W <= n; i += W) {
    const Vectorized<T> old = Vectorized<T>::loadu(p + i);
    Block<T> theta = to_block(old), step = load_block(g + i);
    if (b) store(b + i, old, stream_b);
    Block<T> moved{perturbed_vec<T>(theta.lo, step.lo, sv, adaptive), Opmath<T>()};
    if constexpr (kReduced<T>) moved.hi = perturbed_vec<T>(theta.hi, step.hi, sv, adaptive);
    store(out + i, to_storage(moved), stream_out);
  }
  for (; i < n; ++i) {
    const T old = p[i], step = g[i];
    if (b) b[i] = old;
    out[i] = perturbed(old, step, s, adaptive);
  }
  stream_fence(streamed != nullptr);
}

// One pass over the list: out ← θ + s·w⊙g with w = 1 (SAM) or θ² (ASAM), s read from a device (here
// CPU) scalar; backup ← θ when backup is given (it may be params itself: then nothing is kept).
void perturb_lists(at::TensorList params, at::TensorList grads, at::TensorList out, at::TensorList backup,
                   const at::Tensor& scale, bool adaptive) {
  check_matching("params", params, params);
  check_matching("grads", grads, params);
  check_matching("out", out, params);
  const bool keep = !backup.empty();
  if (keep) check_matching("backup", backup, params);
  const float s = scale.to(at::kFloat).item<float>();
  const bool stream = bytes_of(params) >= stream_bytes();
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[pc.tensor].scalar_type(), "perturb", [&] {
        const scalar_t* p = params[pc.tensor].const_data_ptr<scalar_t>() + pc.begin;
        const scalar_t* g = grads[pc.tensor].const_data_ptr<scalar_t>() + pc.begin;
        scalar_t* o = out[pc.tensor].data_ptr<scalar_t>() + pc.begin;
        scalar_t* b = keep ? backup[pc.tensor].data_ptr<scalar_t>() + pc.begin : nullptr;
        if (b == p) b = nullptr;  // no backup kept: θ is only moved
        // the write-only destination: the backup (in place), or out when it is neither p nor g
        const scalar_t* streamed = !stream ? nullptr : (b && b != g) ? b : (!b && o != p && o != g) ? o : nullptr;
        perturb_range<scalar_t>(p, g, o, b, pc.end - pc.begin, static_cast<at::opmath_type<scalar_t>>(s), adaptive,
                                streamed);
      });
    }
  });
}

// backup ← θ;  θ ← θ + s·w⊙g  (backup may be params itself: then θ is only moved).
void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backup, const at::Tensor& scale,
                 bool adaptive) {
  perturb_lists(params, grads, params, backup, scale, adaptive);
}

// out ← θ + s·w⊙g with θ untouched (out may be grads): the exchange path writes the moved weights into
// the buffer that then trades storage with θ, one write instead of two.
void perturb_to_cpu(at::TensorList params, at::TensorList grads, at::TensorList out, const at::Tensor& scale,
                    bool adaptive) {
  perturb_lists(params, grads, out, {}, scale, adaptive);
}

// -- restore --------------------------------------------------------------------------------------

// dst ← src, byte for byte.
void copy_bytes(char* __restrict__ dst, const char* __restrict__ src, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    const auto addr = reinterpret_cast<std::uintptr_t>(dst);
    const int64_t head = std::min<int64_t>(static_cast<int64_t>((kVecBytes - addr % kVecBytes) % kVecBytes), n);
    std::memcpy(dst, src, head);
    int64_t i = head;
#if defined(CPU_CAPABILITY_AVX512)
    for (; i + 64 <= n; i += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i),
                          _mm512_loadu_si512(reinterpret_cast<const void*>(src + i)));
#else
    for (; i + 32 <= n; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#endif
    std::memcpy(dst + i, src + i, n - i);
    _mm_sfence();
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, n);
}

// θ ← backup, bit for bit.
void restore_cpu(at::TensorList params, at::TensorList backup) {
  check_matching("params", params, params);
  check_matching("backup", backup, params);
  const bool stream = bytes_of(params) >= stream_bytes();
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const int64_t bytes = params[pc.tensor].element_size();
      char* dst = static_cast<char*>(params[pc.tensor].data_ptr()) + pc.begin * bytes;
      const char* src = static_cast<const char*>(backup[pc.tensor].const_data_ptr()) + pc.begin * bytes;
      if (dst != src) copy_bytes(dst, src, (pc.end - pc.begin) * bytes, stream);
    }
  });
}

// -- finite-difference HVP accumulate --------------------------------------------------------------

// a ← a + c·(gm − g0)  (g0 null: a + c·gm), acc and grads of one dtype
template <typename T>
void fd_hvp_range(T* __restrict__ a, const T* __restrict__ gm, const T* __restrict__ g0, int64_t n,
                  at::opmath_type<T> c) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t W = Vectorized<T>::size();
  const Opmath<T> cv(c);
  auto one = [&](Opmath<T> av, Opmath<T> d, Opmath<T> base) {
    if (g0 != nullptr) d = d - base;
    return av + cv * d;
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Block<T> av = load_block(a + i), d = load_block(gm + i);
    Block<T> base = g0 != nullptr ? load_block(g0 + i) : Block<T>{};
    Block<T> out{one(av.lo, d.lo, base.lo), Opmath<T>()};
    if constexpr (kReduced<T>) out.hi = one(av.hi, d.hi, base.hi);
    to_storage(out).store(a + i);
  }
  for (; i < n; ++i) {
    acc_t d = static_cast<acc_t>(gm[i]);
    if (g0 != nullptr) d = d - static_cast<acc_t>(g0[i]);
    a[i] = static_cast<T>(static_cast<acc_t>(a[i]) + c * d);
  }
}

// Finite-difference Hessian-vector step (SPEC §1.2, §1.4):
//   acc ← acc + c·(g_moved − g_base)   (g_base empty: acc ← acc + c·g_moved)
//   θ   ← backup                       (params empty: no restore)
// c is a device scalar (e.g. ‖v‖/r times the regulariser's weight). acc may have another dtype than the grads.
void fd_hvp_accumulate_cpu(at::TensorList acc, at::TensorList g_moved, at::TensorList g_base, const at::Tensor& coeff,
                           at::TensorList params, at::TensorList backup) {
  check_matching("acc", acc, acc);
  check_matching("g_moved", g_moved, acc, false);
  const bool has_base = !g_base.empty();
  if (has_base) check_matching("g_base", g_base, g_moved);
  if (!params.empty()) {
    check_matching("params", params, params);
    check_matching("backup", backup, params);
  }
  const double c = coeff.to(at::kDouble).item<double>();
  auto pieces = pieces_of(acc);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc[pc.tensor].scalar_type(), "fd_hvp_acc", [&] {
        using acc_scalar = scalar_t;
        using opmath = at::opmath_type<scalar_t>;
        acc_scalar* a = acc[pc.tensor].data_ptr<acc_scalar>();
        if (g_moved[pc.tensor].scalar_type() == acc[pc.tensor].scalar_type()) {  // the common case: vectorised
          const acc_scalar* gm = g_moved[pc.tensor].const_data_ptr<acc_scalar>() + pc.begin;
          const acc_scalar* g0 = has_base ? g_base[pc.tensor].const_data_ptr<acc_scalar>() + pc.begin : nullptr;
          fd_hvp_range<acc_scalar>(a + pc.begin, gm, g0, pc.end - pc.begin, static_cast<opmath>(c));
          return;
        }
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_moved[pc.tensor].scalar_type(), "fd_hvp_g", [&] {
          const scalar_t* gm = g_moved[pc.tensor].const_data_ptr<scalar_t>();
          const scalar_t* g0 = has_base ? g_base[pc.tensor].const_data_ptr<scalar_t>() : nullptr;
          const opmath cc = static_cast<opmath>(c);
          for (int64_t i = pc.begin; i < pc.end; ++i) {
            opmath d = static_cast<opmath>(gm[i]);
            if (has_base) d = d - static_cast<opmath>(g0[i]);
            a[i] = static_cast<acc_scalar>(static_cast<opmath>(a[i]) + cc * d);
          }
        });
      });
    }
  });
  if (!params.empty()) restore_cpu(params, backup);
}

// -- AdamW ----------------------------------------------------------------------------------------

template <typename T>
struct AdamCoeffs {
  at::opmath_type<T> decay, w1, b2, w2, neg_step_size, bc2, eps;
};

inline float square_root(float x) { return std::sqrt(x); }
inline double square_root(double x) { return std::sqrt(x); }
template <typename T>
inline Vectorized<T> square_root(const Vectorized<T>& x) { return x.sqrt(); }

template <typename V>
inline V adam_theta(V theta, V gi, V& mi, V& vi, const V& decay, const V& w1, const V& b2, const V& w2,
                    const V& neg_step, const V& bc2, const V& ep) {
  theta = theta * decay;
  mi = mi + w1 * (gi - mi);
  vi = vi * b2 + w2 * gi * gi;
  const V denom = square_root(vi) / bc2 + ep;
  return theta + neg_step * (mi / denom);
}

template <typename T>
void adamw_range(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                 const T* __restrict__ b, int64_t n, const AdamCoeffs<T>& k, bool stream) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t W = Vectorized<T>::size();
  stream = stream && b != nullptr;  // θ is only written when the update starts from the backup
  const int64_t head = head_until_aligned(p, n, stream);
  auto scalar = [&](int64_t i) {
    acc_t mi = static_cast<acc_t>(m[i]), vi = static_cast<acc_t>(v[i]);
    const acc_t theta = adam_theta<acc_t>(static_cast<acc_t>(b != nullptr ? b[i] : p[i]), static_cast<acc_t>(g[i]),
                                          mi, vi, k.decay, k.w1, k.b2, k.w2, k.neg_step_size, k.bc2, k.eps);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    p[i] = static_cast<T>(theta);
  };
  for (int64_t i = 0; i < head; ++i) scalar(i);
  const Opmath<T> decay(k.decay), w1(k.w1), b2(k.b2), w2(k.w2), neg_step(k.neg_step_size), bc2(k.bc2), ep(k.eps);
  int64_t i = head;
  for (; i + W <= n; i += W) {
    Block<T> theta = load_block(b != nullptr ? b + i : p + i), gi = load_block(g + i);
    Block<T> mi = load_block(m + i), vi = load_block(v + i);
    Block<T> out;
    out.lo = adam_theta(theta.lo, gi.lo, mi.lo, vi.lo, decay, w1, b2, w2, neg_step, bc2, ep);
    if constexpr (kReduced<T>) out.hi = adam_theta(theta.hi, gi.hi, mi.hi, vi.hi, decay, w1, b2, w2, neg_step, bc2, ep);
    to_storage(mi).store(m + i);
    to_storage(vi).store(v + i);
    store(p + i, to_storage(out), stream);
  }
  for (; i < n; ++i) scalar(i);
  stream_fence(stream);
}

// One AdamW step (torch.optim.AdamW's formulas), optionally starting from the SAM backup instead of θ:
//   θ ← (backup or θ)·(1 − lr·wd);  m ← m + (1−β1)(g − m);  v ← β2 v + (1−β2) g²
//   θ ← θ − (lr / bc1) · m / (√v / √bc2 + eps)
void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList backup, double lr, double beta1, double beta2, double eps, double weight_decay,
                    double bias_correction1, double bias_correction2_sqrt) {
  check_matching("params", params, params);
  check_matching("grads", grads, params);
  check_matching("exp_avg", exp_avg, params);
  check_matching("exp_avg_sq", exp_avg_sq, params);
  const bool from_backup = !backup.empty();
  if (from_backup) check_matching("backup", backup, params);
  const bool stream = bytes_of(params) >= stream_bytes();
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const int64_t t = pc.tensor;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "adamw", [&] {
        using opmath = at::opmath_type<scalar_t>;
        const AdamCoeffs<scalar_t> coeffs{
            static_cast<opmath>(1.0 - lr * weight_decay), static_cast<opmath>(1.0 - beta1),
            static_cast<opmath>(beta2), static_cast<opmath>(1.0 - beta2),
            -static_cast<opmath>(lr / bias_correction1), static_cast<opmath>(bias_correction2_sqrt),
            static_cast<opmath>(eps)};
        const int64_t off = pc.begin;
        adamw_range<scalar_t>(params[t].data_ptr<scalar_t>() + off, grads[t].const_data_ptr<scalar_t>() + off,
                              exp_avg[t].data_ptr<scalar_t>() + off, exp_avg_sq[t].data_ptr<scalar_t>() + off,
                              from_backup ? backup[t].const_data_ptr<scalar_t>() + off : nullptr, pc.end - pc.begin,
                              coeffs, stream);
      });
    }
  });
}

// The vector instruction set the CPU kernels were compiled for ("avx512", "avx2" or "default").
std::string capability() { return kCapability; }

}  // namespace

TORCH_LIBRARY(unlearn_fast, m) {
  m.def("squared_norm(Tensor[] tensors, Tensor[] weights, bool per_tensor) -> (Tensor, Tensor)");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, Tensor scale, bool adaptive) -> ()");
  m.def("perturb_to_(Tensor[] params, Tensor[] grads, Tensor(a!)[] out, Tensor scale, bool adaptive) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");
  m.def("fd_hvp_accumulate_(Tensor(a!)[] acc, Tensor[] g_moved, Tensor[] g_base, Tensor coeff, "
        "Tensor(b!)[] params, Tensor[] backup) -> ()");
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor[] backup, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "float bias_correction1, float bias_correction2_sqrt) -> ()");
  m.def("cpu_capability() -> str", &capability);
}

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("squared_norm", &squared_norm_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("perturb_to_", &perturb_to_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("fd_hvp_accumulate_", &fd_hvp_accumulate_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
}
