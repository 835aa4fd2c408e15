// The GEMM core's entry point (gemm.h): every check, then the CPU kernel, the emulated CUDA kernel
// or the CUDA kernel. Nothing runs until everything is checked.
#include "gemm/gemm.h"

#include <cstdint>
#include <vector>

#include "core/errors.h"

namespace llmk::gemm {
namespace {

// A float32 vector of `size` elements on `where`'s device, one element per row or column.
void check_vector(const TensorView* view, int64_t size, const TensorView& where) {
  if (!view) return;
  view->check_same_device(where);
  view->check_dtype(DType::f32);
  view->check_shape({size});
  view->check_contiguous();
}

}  // namespace

void gemm(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView& out,
          const TensorView* bias, const TensorView* row_scale, const TensorView* col_scale,
          Activation activation, bool accumulate, const TensorView& workspace, bool b_k_major, void* stream) {
  const int activation_code = static_cast<int>(activation);
  LLMK_CHECK(activation_code >= 0 && activation_code <= 3, ValueError,
             "activation must be 0 (none), 1 (silu), 2 (gelu) or 3 (swiglu); got ", activation_code);

  // Devices: one for every tensor, and one this build can run (a CUDA tensor without CUDA fails here).
  for (const TensorView* view : {&b, &out, a_rows, bias, row_scale, col_scale})
    if (view) view->check_same_device(a);
  const Backend backend = select_backend(a);

  // Dtypes: A and B bfloat16 or float16 on every backend, float32 too on the CPU kernel only (the
  // tensor-core kernel has no float32 path); out A's dtype or float32.
  const bool a_dtype_ok = a.dtype == DType::bf16 || a.dtype == DType::f16 ||
                          (a.dtype == DType::f32 && backend == Backend::cpu);
  LLMK_CHECK(a_dtype_ok, TypeError, a.name, " must be bfloat16 or float16",
             backend == Backend::cpu ? ", or float32" : "",
             " (float32 runs on the CPU kernel only, not on CUDA tensors or under the emulator); got ",
             dtype_name(a.dtype), backend == Backend::cpu ? "" : (backend == Backend::emu ? " (emulated)" : " on CUDA"));
  b.check_same_dtype(a);
  LLMK_CHECK(out.dtype == a.dtype || out.dtype == DType::f32, TypeError, out.name, " must be ",
             dtype_name(a.dtype), " (", a.name, "'s dtype) or float32; got ", dtype_name(out.dtype));

  // Shapes.
  a.check_ndim(2);
  b.check_ndim(2);
  out.check_ndim(2);
  const int64_t k = a.shape[1];
  const int64_t n = b.shape[b_k_major ? 1 : 0];
  LLMK_CHECK(b.shape[b_k_major ? 0 : 1] == k, ValueError, b.name, " must have shape ", b_k_major ? "(k, n)" : "(n, k)",
             " with k = ", k, " (", a.name, "'s columns); got ", b.shape_str());
  LLMK_CHECK(k > 0 && k % 8 == 0, ValueError, "k must be a positive multiple of 8 (got ", k, "): ",
             a.name, " has shape ", a.shape_str());
  LLMK_CHECK(n > 0 && n % 8 == 0, ValueError, "n must be a positive multiple of 8 (got ", n, "): ",
             b.name, " has shape ", b.shape_str());
  const int64_t a_row_count = a.shape[0];
  int64_t m = a_row_count;
  if (a_rows) {
    a_rows->check_dtype(DType::i32);
    a_rows->check_ndim(1);
    a_rows->check_contiguous();
    m = a_rows->shape[0];
  }
  const int64_t out_columns = activation == Activation::swiglu ? n / 2 : n;
  LLMK_CHECK(out.shape[0] == m && out.shape[1] == out_columns, ValueError, out.name, " must have shape (",
             m, ", ", out_columns, ") (m, ", activation == Activation::swiglu ? "n / 2 for swiglu" : "n",
             "); got ", out.shape_str());
  check_vector(bias, n, a);
  check_vector(row_scale, m, a);
  check_vector(col_scale, n, a);

  // Layouts: A row-major with unit stride along k and a row stride lda >= k, a multiple of 8
  // (every row starts 16-byte aligned); B and out contiguous.
  LLMK_CHECK(a.strides[1] == 1, ValueError, a.name, " must have unit stride along k (row-major rows); got shape ",
             a.shape_str(), " with strides ", a.strides_str());
  const int64_t lda = a_row_count <= 1 ? k : a.strides[0];  // a single row's stride is meaningless
  LLMK_CHECK(lda >= k && lda % 8 == 0, ValueError, a.name,
             "'s row stride must be >= k and a multiple of 8 elements (rows start 16-byte aligned); got ",
             lda, " with k = ", k, " (shape ", a.shape_str(), ", strides ", a.strides_str(), ")");
  b.check_contiguous();
  out.check_contiguous();
  for (const TensorView* view : {&a, &b, &out}) view->check_aligned(16);   // cp.async's 16-byte copies

  // Index range of the gathered rows: read here for CPU tensors only. For CUDA tensors reading them
  // would synchronize the host, so the kernel trusts them (an out-of-range row is the caller's bug).
  if (a_rows && a_rows->device == DeviceType::cpu) {
    const int32_t* rows = a_rows->data<int32_t>();
    for (int64_t i = 0; i < m; ++i)
      LLMK_CHECK(rows[i] >= 0 && rows[i] < a_row_count, ValueError, a_rows->name, "[", i,
                 "] must be a row of ", a.name, " in [0, ", a_row_count, "); got ", rows[i]);
  }

  // The output must not share memory with anything the kernel reads (A's span, B, the vectors).
  std::vector<TensorView> read{extent(a), b};
  for (const TensorView* view : {a_rows, bias, row_scale, col_scale})
    if (view) read.push_back(*view);
  check_no_overlap({out}, read);

  // The split-K workspace: float32 on the same device, sharing memory with nothing else.
  workspace.check_same_device(a);
  workspace.check_dtype(DType::f32);
  workspace.check_contiguous();
  const int64_t workspace_needed = split_k_workspace(m, n, k);
  LLMK_CHECK(workspace.numel() >= workspace_needed, ValueError, workspace.name, " must have at least ",
             workspace_needed, " elements (split_k_workspace(m, n, k)); got ", workspace.numel());
  if (workspace_needed > 0) {
    read.push_back(out);
    check_no_overlap({workspace}, read);
  }

  if (m == 0) return;

  Problem p;
  p.dtype = a.dtype;
  p.out_dtype = out.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = a.ptr;
  p.lda = lda;
  p.a_rows = a_rows ? a_rows->data<int32_t>() : nullptr;
  p.b = b.ptr;
  p.ldb = b_k_major ? n : k;
  p.b_k_major = b_k_major;
  p.out = out.ptr;
  p.ldo = out_columns;
  p.bias = bias ? bias->data<float>() : nullptr;
  p.row_scale = row_scale ? row_scale->data<float>() : nullptr;
  p.col_scale = col_scale ? col_scale->data<float>() : nullptr;
  p.activation = activation;
  p.accumulate = accumulate;
  p.workspace = workspace_needed > 0 ? workspace.data<float>() : nullptr;

  run_on_backend(a, stream,
                 Operands().add(a).add(a_rows).add(b).add(out).add(bias).add(row_scale).add(col_scale).add(workspace),
                 [&] { gemm_cpu(p); },
                 [&](auto device_stream) { gemm_device(p, device_stream); });
}

}  // namespace llmk::gemm
