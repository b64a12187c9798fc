// CUDA kernels of the multi-tensor ops declared in multi_tensor.cpp (multi-tensor apply).
//
// A list of tensors is cut into chunks of at most kChunk elements; one CUDA block handles one
// chunk. The chunk table (one row per block: the base address of the tensor in each list, the
// chunk's first element, its length) is built on the host and copied to the device in one
// asynchronous copy, so a whole list is ONE launch per dtype combination (usually one launch).
// Scalars that come from earlier device work (the SAM scale, the FD coefficient) are read from
// device memory: no host sync anywhere. Only core ATen/c10 headers and cuda_runtime.h are used.
//
// This file is compiled only where torch has CUDA and a CUDA compiler exists (ops/_cpp.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per block
constexpr int kThreads = 512;

// One launch: the rows (chunks) whose tensors share the dtypes `dtypes`.
struct Launch {
  std::vector<at::ScalarType> dtypes;
  at::Tensor table;   // [rows, lists + 2] int64 on the device
  int64_t rows = 0;
  int64_t first = 0;  // index of this launch's first row among all rows
};

// Chunk table for parallel lists (all of the first list's length and element counts).
// `owner` (optional) gets the tensor index of each row, in row order.
std::vector<Launch> plan(const std::vector<at::TensorList>& lists, const at::Device& device,
                         std::vector<int64_t>* owner = nullptr) {
  const at::TensorList& first = lists[0];
  const int64_t cols = static_cast<int64_t>(lists.size()) + 2;
  std::map<std::vector<at::ScalarType>, std::vector<int64_t>> groups;  // dtypes -> tensor indices
  for (size_t i = 0; i < first.size(); ++i) {
    std::vector<at::ScalarType> key;
    for (const auto& l : lists) {
      TORCH_CHECK(l[i].is_cuda() && l[i].device() == device, "all tensors must be on ", device);
      TORCH_CHECK(l[i].is_contiguous(), "all tensors must be contiguous");
      TORCH_CHECK(l[i].numel() == first[i].numel(), "tensor ", i, " has mismatched element counts");
      key.push_back(l[i].scalar_type());
    }
    if (first[i].numel() > 0) groups[key].push_back(static_cast<int64_t>(i));
  }
  std::vector<Launch> launches;
  int64_t row_base = 0;
  for (auto& kv : groups) {
    std::vector<int64_t> host;
    for (int64_t i : kv.second) {
      const int64_t n = first[i].numel();
      for (int64_t b = 0; b < n; b += kChunk) {
        for (const auto& l : lists) host.push_back(reinterpret_cast<int64_t>(l[i].data_ptr()));
        host.push_back(b);
        host.push_back(std::min(kChunk, n - b));
        if (owner) owner->push_back(i);
      }
    }
    Launch launch;
    launch.dtypes = kv.first;
    launch.rows = static_cast<int64_t>(host.size()) / cols;
    launch.first = row_base;
    row_base += launch.rows;
    at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
    launch.table = pinned.to(device, /*non_blocking=*/true);  // the host allocator keeps `pinned` alive until copied
    launches.push_back(std::move(launch));
  }
  return launches;
}

template <typename T>
__device__ __forceinline__ T* col(const int64_t* row, int j) {
  return reinterpret_cast<T*>(row[j]);
}

template <typename T, bool Weighted>
__global__ void squared_norm_kernel(const int64_t* table, int cols, float* partial) {
  using acc_t = at::opmath_type<T>;
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * cols;
  const T* x = col<const T>(row, 0);
  const T* w = Weighted ? col<const T>(row, 1) : nullptr;
  const int64_t begin = row[cols - 2], n = row[cols - 1];
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    acc_t v = static_cast<acc_t>(x[begin + i]);
    if (Weighted) v *= fabs(static_cast<acc_t>(w[begin + i]));
    acc += v * v;
  }
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<float>(shared[0]);
}

// InPlace: column 2 is the backup (b ← θ, θ ← θ + s·w⊙g); otherwise column 2 is out (out ← θ + s·w⊙g,
// θ untouched: the exchange path). Either may be g itself: each element is read before it is written.
template <typename T, bool Adaptive, bool InPlace>
__global__ void perturb_kernel(const int64_t* table, const float* scale) {
  using acc_t = at::opmath_type<T>;
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * 5;
  T* p = col<T>(row, 0);
  const T* g = col<const T>(row, 1);
  T* d = col<T>(row, 2);
  const int64_t begin = row[3], n = row[4];
  const acc_t s = static_cast<acc_t>(*scale);
  for (int64_t i = begin + threadIdx.x; i < begin + n; i += blockDim.x) {
    const T old = p[i];
    const acc_t theta = static_cast<acc_t>(old);
    acc_t step = static_cast<acc_t>(g[i]);
    if (Adaptive) step = step * (theta * theta);
    step = step * s;
    const T moved = static_cast<T>(step + theta);
    if (InPlace) {
      d[i] = old;
      p[i] = moved;
    } else {
      d[i] = moved;
    }
  }
}

template <typename T>
__global__ void copy_kernel(const int64_t* table) {
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * 4;
  T* dst = col<T>(row, 0);
  const T* src = col<const T>(row, 1);
  const int64_t begin = row[2], n = row[3];
  for (int64_t i = begin + threadIdx.x; i < begin + n; i += blockDim.x) dst[i] = src[i];
}

template <typename A, typename G, bool HasBase>
__global__ void fd_hvp_kernel(const int64_t* table, int cols, const float* coeff) {
  using acc_t = at::opmath_type<A>;
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * cols;
  A* a = col<A>(row, 0);
  const G* gm = col<const G>(row, 1);
  const G* g0 = HasBase ? col<const G>(row, 2) : nullptr;
  const int64_t begin = row[cols - 2], n = row[cols - 1];
  const acc_t c = static_cast<acc_t>(*coeff);
  for (int64_t i = begin + threadIdx.x; i < begin + n; i += blockDim.x) {
    acc_t d = static_cast<acc_t>(gm[i]);
    if (HasBase) d = d - static_cast<acc_t>(g0[i]);
    a[i] = static_cast<A>(static_cast<acc_t>(a[i]) + c * d);
  }
}

struct AdamArgs {
  float lr, decay, w1, beta2, w2, step_size, bc2, eps;
};

template <typename T, bool FromBackup>
__global__ void adamw_kernel(const int64_t* table, int cols, AdamArgs args) {
  using acc_t = at::opmath_type<T>;
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * cols;
  T* p = col<T>(row, 0);
  const T* g = col<const T>(row, 1);
  T* m = col<T>(row, 2);
  T* v = col<T>(row, 3);
  const T* b = FromBackup ? col<const T>(row, 4) : nullptr;
  const int64_t begin = row[cols - 2], n = row[cols - 1];
  for (int64_t i = begin + threadIdx.x; i < begin + n; i += blockDim.x) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    acc_t theta = static_cast<acc_t>(FromBackup ? b[i] : p[i]) * static_cast<acc_t>(args.decay);
    acc_t mi = static_cast<acc_t>(m[i]);
    mi = mi + static_cast<acc_t>(args.w1) * (gi - mi);
    const acc_t vi = static_cast<acc_t>(v[i]) * static_cast<acc_t>(args.beta2) + static_cast<acc_t>(args.w2) * gi * gi;
    const acc_t denom = sqrt(vi) / static_cast<acc_t>(args.bc2) + static_cast<acc_t>(args.eps);
    theta = theta - static_cast<acc_t>(args.step_size) * (mi / denom);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    p[i] = static_cast<T>(theta);
  }
}

#define UF_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> squared_norm_cuda(at::TensorList tensors, at::TensorList weights, bool per_tensor) {
  const at::Device device = tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool weighted = !weights.empty();
  std::vector<at::TensorList> lists{tensors};
  if (weighted) lists.push_back(weights);
  std::vector<int64_t> owner;
  auto launches = plan(lists, device, &owner);
  const int cols = static_cast<int>(lists.size()) + 2;
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partial = at::zeros({static_cast<int64_t>(owner.size())}, f32);
  for (auto& l : launches) {
    UF_DISPATCH(l.dtypes[0], "squared_norm_cuda", [&] {
      TORCH_CHECK(!weighted || l.dtypes[1] == l.dtypes[0], "weights must have the dtype of tensors");
      float* out = partial.data_ptr<float>() + l.first;
      if (weighted)
        squared_norm_kernel<scalar_t, true><<<l.rows, kThreads, 0, stream>>>(l.table.data_ptr<int64_t>(), cols, out);
      else
        squared_norm_kernel<scalar_t, false><<<l.rows, kThreads, 0, stream>>>(l.table.data_ptr<int64_t>(), cols, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor total = partial.sum(at::kDouble).to(at::kFloat);  // stays on the device
  at::Tensor per = at::zeros({per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, f32);
  if (per_tensor && !owner.empty()) {
    at::Tensor idx = at::tensor(owner, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/false);
    per.index_add_(0, idx, partial);
  }
  return {total, per};
}

template <bool InPlace>
void perturb_lists_cuda(at::TensorList params, at::TensorList grads, at::TensorList dst, const at::Tensor& scale,
                        bool adaptive) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor s = scale.to(device, at::kFloat).contiguous();
  for (auto& l : plan({params, grads, dst}, device)) {
    TORCH_CHECK(l.dtypes[0] == l.dtypes[1] && l.dtypes[0] == l.dtypes[2], "params, grads and backup/out must share dtypes");
    UF_DISPATCH(l.dtypes[0], "perturb_cuda", [&] {
      if (adaptive)
        perturb_kernel<scalar_t, true, InPlace><<<l.rows, kThreads, 0, stream>>>(l.table.data_ptr<int64_t>(),
                                                                                 s.data_ptr<float>());
      else
        perturb_kernel<scalar_t, false, InPlace><<<l.rows, kThreads, 0, stream>>>(l.table.data_ptr<int64_t>(),
                                                                                  s.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backup, const at::Tensor& scale,
                  bool adaptive) {
  perturb_lists_cuda<true>(params, grads, backup, scale, adaptive);
}

void perturb_to_cuda(at::TensorList params, at::TensorList grads, at::TensorList out, const at::Tensor& scale,
                     bool adaptive) {
  perturb_lists_cuda<false>(params, grads, out, scale, adaptive);
}

void restore_cuda(at::TensorList params, at::TensorList backup) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  for (auto& l : plan({params, backup}, device)) {
    TORCH_CHECK(l.dtypes[0] == l.dtypes[1], "params and backup must share dtypes");
    UF_DISPATCH(l.dtypes[0], "restore_cuda", [&] {
      copy_kernel<scalar_t><<<l.rows, kThreads, 0, stream>>>(l.table.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void fd_hvp_accumulate_cuda(at::TensorList acc, at::TensorList g_moved, at::TensorList g_base, const at::Tensor& coeff,
                            at::TensorList params, at::TensorList backup) {
  const at::Device device = acc[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor c = coeff.to(device, at::kFloat).contiguous();
  const bool has_base = !g_base.empty();
  std::vector<at::TensorList> lists{acc, g_moved};
  if (has_base) lists.push_back(g_base);
  const int cols = static_cast<int>(lists.size()) + 2;
  for (auto& l : plan(lists, device)) {
    TORCH_CHECK(!has_base || l.dtypes[1] == l.dtypes[2], "g_moved and g_base must share dtypes");
    UF_DISPATCH(l.dtypes[0], "fd_hvp_acc_cuda", [&] {
      using acc_scalar = scalar_t;
      UF_DISPATCH(l.dtypes[1], "fd_hvp_g_cuda", [&] {
        const int64_t* table = l.table.data_ptr<int64_t>();
        if (has_base)
          fd_hvp_kernel<acc_scalar, scalar_t, true><<<l.rows, kThreads, 0, stream>>>(table, cols, c.data_ptr<float>());
        else
          fd_hvp_kernel<acc_scalar, scalar_t, false><<<l.rows, kThreads, 0, stream>>>(table, cols, c.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (!params.empty()) restore_cuda(params, backup);
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                     at::TensorList backup, double lr, double beta1, double beta2, double eps, double weight_decay,
                     double bias_correction1, double bias_correction2_sqrt) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool from_backup = !backup.empty();
  std::vector<at::TensorList> lists{params, grads, exp_avg, exp_avg_sq};
  if (from_backup) lists.push_back(backup);
  const int cols = static_cast<int>(lists.size()) + 2;
  AdamArgs args{static_cast<float>(lr), static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(lr / bias_correction1),
                static_cast<float>(bias_correction2_sqrt), static_cast<float>(eps)};
  for (auto& l : plan(lists, device)) {
    for (auto d : l.dtypes) TORCH_CHECK(d == l.dtypes[0], "adamw_step_: all lists must share each tensor's dtype");
    UF_DISPATCH(l.dtypes[0], "adamw_cuda", [&] {
      const int64_t* table = l.table.data_ptr<int64_t>();
      if (from_backup)
        adamw_kernel<scalar_t, true><<<l.rows, kThreads, 0, stream>>>(table, cols, args);
      else
        adamw_kernel<scalar_t, false><<<l.rows, kThreads, 0, stream>>>(table, cols, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("squared_norm", &squared_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("perturb_to_", &perturb_to_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("fd_hvp_accumulate_", &fd_hvp_accumulate_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
}
