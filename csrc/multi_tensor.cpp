// Multi-tensor ops of unlearn_fast: global L2 norm, SAM perturb with backup, exact restore,
// finite-difference Hessian-vector accumulate-and-restore, and a fused AdamW update.
//
// Every op takes whole lists of tensors and makes ONE pass over them: the lists are cut into
// pieces of at most kPiece elements and at::parallel_for walks the pieces, so a list of 300
// tensors is one parallel loop, not 300 dispatches. Arithmetic is in the "opmath" type (fp32 for
// fp16/bf16/fp32 storage, fp64 for fp64) with one rounding to the storage type at the end.
// This file holds the schemas (TORCH_LIBRARY) and the CPU kernels; multi_tensor_cuda.cu holds the
// CUDA kernels of the same ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPiece = 1 << 15;  // elements per unit of parallel work
constexpr int kLanes = 16;           // independent accumulators: lets the compiler vectorise the reduction

struct Piece {
  int64_t tensor, begin, end;
};

std::vector<Piece> pieces_of(at::TensorList ts) {
  std::vector<Piece> out;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i)
    for (int64_t b = 0; b < ts[i].numel(); b += kPiece) out.push_back({i, b, std::min(b + kPiece, ts[i].numel())});
  return out;
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

template <typename T, bool Weighted>
double sum_of_squares(const T* x, const T* w, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_t v = static_cast<acc_t>(x[i + j]);
      if (Weighted) v *= std::abs(static_cast<acc_t>(w[i + j]));
      lanes[j] += v * v;
    }
  }
  double total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
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

// backup ← θ;  θ ← θ + s·w⊙g  with w = 1 (SAM) or θ² (ASAM); s read from a device (here CPU) scalar.
void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backup, const at::Tensor& scale,
                 bool adaptive) {
  check_matching("params", params, params);
  check_matching("grads", grads, params);
  check_matching("backup", backup, params);
  const float s = scale.to(at::kFloat).item<float>();
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[pc.tensor].scalar_type(), "perturb", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* p = params[pc.tensor].data_ptr<scalar_t>();
        const scalar_t* g = grads[pc.tensor].const_data_ptr<scalar_t>();
        scalar_t* b = backup[pc.tensor].data_ptr<scalar_t>();
        const acc_t sc = static_cast<acc_t>(s);
        for (int64_t i = pc.begin; i < pc.end; ++i) {
          const scalar_t old = p[i];
          const acc_t theta = static_cast<acc_t>(old);
          acc_t step = static_cast<acc_t>(g[i]);
          if (adaptive) step = step * (theta * theta);
          step = step * sc;
          b[i] = old;
          p[i] = static_cast<scalar_t>(step + theta);
        }
      });
    }
  });
}

// θ ← backup, bit for bit.
void restore_cpu(at::TensorList params, at::TensorList backup) {
  check_matching("params", params, params);
  check_matching("backup", backup, params);
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const int64_t bytes = params[pc.tensor].element_size();
      std::memcpy(static_cast<char*>(params[pc.tensor].data_ptr()) + pc.begin * bytes,
                  static_cast<const char*>(backup[pc.tensor].const_data_ptr()) + pc.begin * bytes,
                  (pc.end - pc.begin) * bytes);
    }
  });
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
  auto pieces = pieces_of(params);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const int64_t t = pc.tensor;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "adamw", [&] {
        using opmath = at::opmath_type<scalar_t>;
        scalar_t* p = params[t].data_ptr<scalar_t>();
        const scalar_t* g = grads[t].const_data_ptr<scalar_t>();
        scalar_t* m = exp_avg[t].data_ptr<scalar_t>();
        scalar_t* v = exp_avg_sq[t].data_ptr<scalar_t>();
        const scalar_t* b = from_backup ? backup[t].const_data_ptr<scalar_t>() : nullptr;
        const opmath decay = static_cast<opmath>(1.0 - lr * weight_decay);
        const opmath w1 = static_cast<opmath>(1.0 - beta1), b2 = static_cast<opmath>(beta2);
        const opmath w2 = static_cast<opmath>(1.0 - beta2);
        const opmath step_size = static_cast<opmath>(lr / bias_correction1);
        const opmath bc2 = static_cast<opmath>(bias_correction2_sqrt), ep = static_cast<opmath>(eps);
        for (int64_t i = pc.begin; i < pc.end; ++i) {
          const opmath gi = static_cast<opmath>(g[i]);
          opmath theta = static_cast<opmath>(from_backup ? b[i] : p[i]) * decay;
          opmath mi = static_cast<opmath>(m[i]);
          mi = mi + w1 * (gi - mi);
          const opmath vi = static_cast<opmath>(v[i]) * b2 + w2 * gi * gi;
          const opmath denom = std::sqrt(vi) / bc2 + ep;
          theta = theta + (-step_size) * (mi / denom);
          m[i] = static_cast<scalar_t>(mi);
          v[i] = static_cast<scalar_t>(vi);
          p[i] = static_cast<scalar_t>(theta);
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY(unlearn_fast, m) {
  m.def("squared_norm(Tensor[] tensors, Tensor[] weights, bool per_tensor) -> (Tensor, Tensor)");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, Tensor scale, bool adaptive) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");
  m.def("fd_hvp_accumulate_(Tensor(a!)[] acc, Tensor[] g_moved, Tensor[] g_base, Tensor coeff, "
        "Tensor(b!)[] params, Tensor[] backup) -> ()");
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor[] backup, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "float bias_correction1, float bias_correction2_sqrt) -> ()");
}

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("squared_norm", &squared_norm_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("fd_hvp_accumulate_", &fd_hvp_accumulate_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
}
