// Entry points of the LoRA family (lora.h): every check before any kernel runs.
#include "lora/lora.h"

#include <cmath>
#include <vector>

#include "common/quant_format.h"
#include "core/errors.h"
#include "quant/quant.h"

namespace llmk::lora {

void lora_linear(const TensorView& x, const TensorView& weight, const TensorView& lora_a, const TensorView& lora_b,
                 double scale, const Extras& optional, const std::vector<int64_t>& slices, bool transposed,
                 const TensorView& shrink, const TensorView& out, const TensorView& workspace,
                 const TensorView& tiles, void* stream) {
  const TensorView *x_lora = optional.x_lora, *bias = optional.bias, *ids = optional.adapter_ids,
                   *ranks = optional.ranks, *scales = optional.scales;
  const bool int4 = optional.int4.scales != nullptr;
  for (const TensorView* t : {&x, &shrink, &out}) t->check_ndim(2);
  weight.check_ndim(int4 ? 3 : 2);
  lora_a.check_ndim(4);
  lora_b.check_ndim(3);
  const Backend backend = select_backend(x);
  LLMK_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f16 || (x.dtype == DType::f32 && backend == Backend::cpu),
             TypeError, x.name, " must be bfloat16 or float16 (float32 on the CPU kernel only); got ",
             dtype_name(x.dtype));
  for (const TensorView* t : {&lora_a, &lora_b, &shrink, &out}) t->check_same_dtype(x);
  if (int4) weight.check_dtype(DType::i32);
  else weight.check_same_dtype(x);
  for (const TensorView* t : {&weight, &lora_a, &lora_b, &shrink, &out, &workspace, &tiles, bias, x_lora, ids, ranks,
                              scales})
    if (t) t->check_same_device(x);
  // (int4: weight is the packed codes (N / 8, ceil(K / 32), 32), K from x)
  const int64_t n = int4 ? weight.shape[0] * quant::kInt4BlockN : weight.shape[0];
  const int64_t k = int4 ? x.shape[1] : weight.shape[1], m = x.shape[0];
  const int64_t adapters = lora_a.shape[0], s_count = lora_a.shape[1], r = lora_a.shape[2];
  if (x_lora) {
    x_lora->check_same_dtype(x);
    x_lora->check_shape({m, x.shape[1]});
    LLMK_CHECK(x_lora->strides[1] == 1 || x.shape[1] <= 1, ValueError, x_lora->name,
               " must have a contiguous last dimension");
    if (backend != Backend::cpu) x_lora->check_rows_aligned();
  }
  const int64_t in_features = transposed ? n : k, out_features = transposed ? k : n;
  LLMK_CHECK(x.strides[1] == 1 || x.shape[1] <= 1, ValueError, x.name,
             " must have a contiguous last dimension; got strides ", x.strides_str());
  LLMK_CHECK(k > 0 && k % 8 == 0 && n > 0 && n % 8 == 0, ValueError,
             "weight must be (N, K) with N and K positive multiples of 8; got ", weight.shape_str());
  LLMK_CHECK(x.shape[1] == in_features, ValueError, x.name, " must have ", in_features, " columns (",
             transposed ? "weight's rows N" : "weight's columns K", "); got ", x.shape_str());
  LLMK_CHECK(r >= 8 && r <= 256 && r % 8 == 0, ValueError,
             "lora_a must have a rank (dimension 2) that is a multiple of 8 in [8, 256] (the Python layer pads it); got ",
             lora_a.shape_str());
  LLMK_CHECK(adapters >= 1 && adapters <= (int64_t(1) << 24), ValueError,
             "lora_a must hold 1 to 2^24 adapters (dimension 0); got ", lora_a.shape_str());
  LLMK_CHECK(s_count == int64_t(slices.size()) && s_count >= 1 && s_count <= kMaxSlices, ValueError,
             "lora_a must have one slice (dimension 1) per entry of slices, at most ", kMaxSlices, "; got ",
             lora_a.shape_str(), " and ", slices.size(), " slices");
  lora_a.check_shape({adapters, s_count, r, k});
  lora_b.check_shape({adapters, n, r});
  int64_t offsets[kMaxSlices + 1] = {};
  for (int64_t s = 0; s < s_count; ++s) {
    LLMK_CHECK(slices[size_t(s)] > 0 && slices[size_t(s)] % 8 == 0, ValueError,
               "slices must be positive multiples of 8; got ", slices[size_t(s)], " at ", s);
    offsets[s + 1] = offsets[s] + slices[size_t(s)];
  }
  LLMK_CHECK(offsets[s_count] == n, ValueError, "slices must sum to the weight's rows N = ", n, "; got ",
             offsets[s_count]);
  int64_t group_size = 0;
  if (int4) {
    LLMK_CHECK(optional.int4.zeros, ValueError, "an int4 weight needs its zeros beside its scales");
    LLMK_CHECK(!transposed, ValueError, "the transposed product (dx) takes a 16-bit weight (dequantize the int4 one)");
    weight.check_shape({n / quant::kInt4BlockN, quant::int4_k_blocks(k), 32});
    group_size = quant::check_int4_groups(n, k, optional.int4.group_size, *optional.int4.scales,
                                          *optional.int4.zeros, x);
    if (backend != Backend::cpu) {
      LLMK_CHECK(optional.int4.scales->dtype == x.dtype, TypeError, "the int4 weight's scales must have x's dtype (",
                 dtype_name(x.dtype), ") for the CUDA kernel, which dequantizes in it; got ",
                 dtype_name(optional.int4.scales->dtype));
      optional.int4.scales->check_rows_aligned();
      optional.int4.zeros->check_aligned(8);
    }
  }
  if (transposed)
    LLMK_CHECK(adapters == 1 && s_count == 1 && !ids && !ranks && !scales && !bias, ValueError,
               "the transposed product (dx) takes one adapter and one slice, without adapter_ids, ranks, scales "
               "or bias");
  LLMK_CHECK(ids || adapters == 1, ValueError, "lora_a holds ", adapters, " adapters: adapter_ids must say which "
             "each row uses");
  const TensorView* order = optional.row_order;
  LLMK_CHECK(!order || ids, ValueError, "row_order needs adapter_ids (in that order)");
  for (const TensorView* t : {ids, order})
    if (t) {
      t->check_dtype(DType::i32);
      t->check_shape({m});
      t->check_contiguous();
      t->check_same_device(x);
    }
  LLMK_CHECK(!order || backend == Backend::cpu || m > gemm::kSplitMaxRows, ValueError,
             "row_order is for M > ", gemm::kSplitMaxRows, " on the CUDA kernels (their split-K stores rows in order)");
  if (ranks) {
    ranks->check_dtype(DType::i32);
    ranks->check_shape({adapters});
    ranks->check_contiguous();
  }
  if (scales) {
    scales->check_dtype(DType::f32);
    scales->check_shape({adapters, s_count});
    scales->check_contiguous();
  }
  shrink.check_shape({m, s_count * r});
  out.check_shape({m, out_features});
  LLMK_CHECK(std::isfinite(scale), ValueError, "scale must be finite; got ", scale);
  if (bias) {
    bias->check_dtype(DType::f32);
    bias->check_shape({n});
    bias->check_contiguous();
  }
  for (const TensorView* t : {&weight, &lora_a, &lora_b, &shrink, &out}) t->check_contiguous();
  workspace.check_dtype(DType::f32);
  workspace.check_contiguous();
  tiles.check_dtype(DType::i32);
  tiles.check_contiguous();
  const bool device = backend != Backend::cpu;
  const int64_t needed = device ? lora_workspace(m, out_features, in_features, r, adapters, s_count, ids) : 0;
  LLMK_CHECK(workspace.numel() >= needed, ValueError, "workspace must have at least ", needed,
             " float32 elements (the CUDA kernel's split-K); got ", workspace.numel());
  const int64_t tiles_needed = device ? lora_tiles(m, adapters, ids) : 0;
  LLMK_CHECK(tiles.numel() >= tiles_needed, ValueError, "tiles must have at least ", tiles_needed,
             " int32 elements (the CUDA kernel's adapter lists); got ", tiles.numel());
  std::vector<TensorView> read{extent(x), weight, lora_a, lora_b};
  for (const TensorView* t : {bias, ids, order, ranks, scales, optional.int4.scales, optional.int4.zeros})
    if (t) read.push_back(*t);
  if (x_lora) read.push_back(extent(*x_lora));
  check_no_overlap({shrink, out, workspace, tiles}, read);
  if (device)
    for (const TensorView* t : {&x, &weight, &lora_a, &lora_b, &shrink, &out}) t->check_rows_aligned();
  Problem p;
  p.dtype = x.dtype;
  p.m = m;
  p.in_features = in_features;
  p.out_features = out_features;
  p.rank = r;
  p.adapters = adapters;
  p.slices = s_count;
  for (int64_t s = 0; s <= s_count; ++s) p.slice_offsets[s] = offsets[s];
  p.ldx = m <= 1 ? in_features : x.strides[0];
  p.transposed = transposed;
  p.scale = float(scale);
  p.x = x.ptr;
  p.x_lora = x_lora ? x_lora->ptr : x.ptr;
  p.ld_lora = !x_lora ? p.ldx : m <= 1 ? in_features : x_lora->strides[0];
  p.weight = weight.ptr;
  p.int4 = int4;
  if (int4) {
    p.w_scales = optional.int4.scales->ptr;
    p.w_scale_dtype = optional.int4.scales->dtype;
    p.w_zeros = optional.int4.zeros->data<uint8_t>();
    p.group_size = group_size;
  }
  p.lora_a = lora_a.ptr;
  p.lora_b = lora_b.ptr;
  p.bias = bias ? bias->data<float>() : nullptr;
  p.adapter_ids = ids ? ids->data<int32_t>() : nullptr;
  p.row_order = order ? order->data<int32_t>() : nullptr;
  p.ranks = ranks ? ranks->data<int32_t>() : nullptr;
  p.scales = scales ? scales->data<float>() : nullptr;
  p.shrink = shrink.ptr;
  p.out = out.ptr;
  p.workspace = workspace.numel() ? workspace.data<float>() : nullptr;
  p.tiles = tiles.numel() ? tiles.data<int32_t>() : nullptr;
  if (m == 0) return;
  run_on_backend(x, stream,
                 Operands().add(x).add(x_lora).add(weight).add(lora_a).add(lora_b).add(bias).add(ids).add(order).add(ranks)
                     .add(scales).add(optional.int4.scales).add(optional.int4.zeros).add(shrink).add(out).add(workspace).add(tiles),
                 [&] { lora_linear_cpu(p); }, [&](auto device_stream) { lora_linear_device(p, device_stream); });
}

void dropout(const TensorView& x, uint64_t seed, uint32_t threshold, double keep_scale, const TensorView& out,
             void* stream) {
  x.check_ndim(2);
  const Backend backend = select_backend(x);
  LLMK_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f16 || (x.dtype == DType::f32 && backend == Backend::cpu),
             TypeError, x.name, " must be bfloat16 or float16 (float32 on the CPU kernel only); got ",
             dtype_name(x.dtype));
  out.check_same_dtype(x);
  out.check_same_device(x);
  const int64_t m = x.shape[0], k = x.shape[1];
  LLMK_CHECK(k % 8 == 0, ValueError, x.name, " must have a multiple of 8 columns; got ", x.shape_str());
  LLMK_CHECK(x.strides[1] == 1 || k <= 1, ValueError, x.name, " must have a contiguous last dimension");
  out.check_shape({m, k});
  out.check_contiguous();
  LLMK_CHECK(std::isfinite(keep_scale) && keep_scale >= 1.0, ValueError, "keep_scale must be 1 / (1 - p) >= 1; got ",
             keep_scale);
  check_no_overlap({out}, {extent(x)});
  if (backend != Backend::cpu)
    for (const TensorView* t : {&x, &out}) t->check_rows_aligned();
  DropoutProblem p;
  p.dtype = x.dtype;
  p.m = m;
  p.k = k;
  p.ldx = m <= 1 ? k : x.strides[0];
  p.seed = seed;
  p.threshold = threshold;
  p.keep_scale = float(keep_scale);
  p.x = x.ptr;
  p.out = out.ptr;
  if (m == 0 || k == 0) return;
  run_on_backend(x, stream, Operands().add(x).add(out), [&] { dropout_cpu(p); },
                 [&](auto device_stream) { dropout_device(p, device_stream); });
}

}  // namespace llmk::lora
