// Entry points of the vocabulary's test kernels (vocabulary_kernels.h): every check before the
// launch, then run_device (CPU tensors: the emulator; CUDA tensors: the GPU).
#include <string>
#include <vector>

#include "common/swizzle.h"
#include "core/errors.h"
#include "testing/vocabulary_kernels.h"

namespace llmk::testing::vocabulary {
namespace {

void check_all(std::initializer_list<const TensorView*> views) {
  const TensorView& first = **views.begin();
  for (const TensorView* v : views) {
    v->check_same_device(first);
    v->check_contiguous();
  }
}

}  // namespace

void mma(const TensorView& a, const TensorView& w, const TensorView& c, const TensorView& d, bool via_shared,
         void* stream) {
  check_all({&a, &w, &c, &d});
  LLMK_CHECK(a.dtype == DType::bf16 || a.dtype == DType::f16 || a.dtype == DType::i8, TypeError,
             "a must be bfloat16, float16 or int8; got ", dtype_name(a.dtype));
  w.check_same_dtype(a);
  const int64_t k = a.dtype == DType::i8 ? 32 : 16;
  const DType accumulator = a.dtype == DType::i8 ? DType::i32 : DType::f32;
  a.check_shape({16, k});
  w.check_shape({8, k});
  c.check_shape({16, 8});
  d.check_shape({16, 8});
  c.check_dtype(accumulator);
  d.check_dtype(accumulator);
  check_no_overlap({d}, {a, w, c});
  run_device(a, stream, Operands().add(a).add(w).add(c).add(d), [&](auto device_stream) {
    mma_device(a.dtype, a.ptr, w.ptr, c.ptr, d.ptr, via_shared, device_stream);
  });
}

void ldmatrix(const TensorView& rows, const TensorView& slots, const TensorView& out, int count, bool transposed,
              void* stream) {
  LLMK_CHECK(count == 1 || count == 2 || count == 4, ValueError, "count must be 1, 2 or 4; got ", count);
  check_all({&rows, &slots, &out});
  rows.check_dtype(DType::i16);
  rows.check_shape({8 * count, 8});
  slots.check_dtype(DType::i32);
  slots.check_shape({8 * count});
  out.check_dtype(DType::i32);
  out.check_shape({32, count});
  check_no_overlap({out}, {rows, slots});
  run_device(rows, stream, Operands().add(rows).add(slots).add(out), [&](auto device_stream) {
    ldmatrix_device(count, transposed, rows.ptr, slots.data<int32_t>(), out.data<int32_t>(), device_stream);
  });
}

void cp_async(const TensorView& source, const TensorView& source_bytes, const TensorView& out, bool read_early,
              void* stream) {
  check_all({&source, &source_bytes, &out});
  source.check_dtype(DType::u8);
  source_bytes.check_dtype(DType::i32);
  out.check_dtype(DType::u8);
  source_bytes.check_ndim(2);
  const int64_t threads = source_bytes.shape[0];
  LLMK_CHECK(threads >= 2 && threads <= 1024 && threads % 2 == 0, ValueError,
             "source_bytes must have an even number of rows (threads) in [2, 1024]; got ", threads);
  source_bytes.check_shape({threads, 3});
  source.check_shape({threads, 32});
  out.check_shape({threads, 48});
  check_no_overlap({out}, {source, source_bytes});
  run_device(source, stream, Operands().add(source).add(source_bytes).add(out), [&](auto device_stream) {
    cp_async_device(source.data<uint8_t>(), source_bytes.data<int32_t>(), out.data<uint8_t>(), int(threads), read_early,
                    device_stream);
  });
}

void warp_reduce(const TensorView& x, const TensorView& sum, const TensorView& max, void* stream) {
  check_all({&x, &sum, &max});
  LLMK_CHECK(x.dtype == DType::f32 || x.dtype == DType::i32, TypeError, "x must be float32 or int32; got ",
             dtype_name(x.dtype));
  sum.check_same_dtype(x);
  max.check_same_dtype(x);
  const int64_t n = x.numel();
  LLMK_CHECK(n > 0 && n % 32 == 0 && n <= (int64_t(1) << 30), ValueError,
             "x must have a positive multiple of 32 elements; got ", n);
  sum.check_numel(n);
  max.check_numel(n);
  check_no_overlap({sum, max}, {x});
  run_device(x, stream, Operands().add(x).add(sum).add(max), [&](auto device_stream) {
    warp_reduce_device(x.dtype, x.ptr, sum.ptr, max.ptr, n, device_stream);
  });
}

void vector_copy(const TensorView& source, const TensorView& out, int bytes, bool once, void* stream) {
  LLMK_CHECK(once ? (bytes == 4 || bytes == 8 || bytes == 16)
                  : (bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8 || bytes == 16),
             ValueError, once ? "load_global_once moves 4, 8 or 16 bytes" : "load_global moves 1, 2, 4, 8 or 16 bytes",
             "; got ", bytes);
  check_all({&source, &out});
  source.check_dtype(DType::u8);
  out.check_dtype(DType::u8);
  const int64_t n = source.numel();
  LLMK_CHECK(n > 0 && n % (64 * bytes) == 0 && n <= (int64_t(1) << 30), ValueError,
             "source must have a positive multiple of 64 * bytes elements; got ", n);
  out.check_numel(n);
  LLMK_CHECK(reinterpret_cast<uintptr_t>(source.ptr) % bytes == 0 && reinterpret_cast<uintptr_t>(out.ptr) % bytes == 0,
             ValueError, "source and out must be aligned to ", bytes, " bytes");
  check_no_overlap({out}, {source});
  run_device(source, stream, Operands().add(source).add(out), [&](auto device_stream) {
    vector_copy_device(bytes, once, source.ptr, out.ptr, n / bytes, device_stream);
  });
}

void ldmatrix_tile(const TensorView& source, const TensorView& out, bool swizzled, void* stream) {
  check_all({&source, &out});
  source.check_dtype(DType::u8);
  source.check_ndim(2);
  const int64_t rows = source.shape[0], row_bytes = source.shape[1];
  LLMK_CHECK(row_bytes == 64 || row_bytes == 128, ValueError, "source rows must be 64 or 128 bytes; got ", row_bytes);
  LLMK_CHECK(rows > 0 && rows % 8 == 0 && rows * row_bytes <= 32768, ValueError,
             "source must have a positive multiple of 8 rows and at most 32 KB; got ", rows);
  LLMK_CHECK(reinterpret_cast<uintptr_t>(source.ptr) % 16 == 0, ValueError, "source must be aligned to 16 bytes");
  out.check_dtype(DType::i32);
  out.check_shape({rows / 8 * (row_bytes / 64), 32, 4});
  check_no_overlap({out}, {source});
  run_device(source, stream, Operands().add(source).add(out), [&](auto device_stream) {
    ldmatrix_tile_device(source.data<uint8_t>(), int(rows), int(row_bytes), swizzled, out.data<int32_t>(), device_stream);
  });
}

std::vector<int> swizzled_offsets(int row_bytes, int rows) {
  LLMK_CHECK(row_bytes == 16 || row_bytes == 32 || row_bytes == 64 || row_bytes == 128 || row_bytes == 256 ||
                 row_bytes == 512,
             ValueError, "row_bytes must be 16, 32, 64, 128, 256 or 512; got ", row_bytes);
  LLMK_CHECK(rows > 0 && rows <= 4096, ValueError, "rows must be in [1, 4096]; got ", rows);
  const SwizzledTile tile{row_bytes};
  std::vector<int> out;
  out.reserve(size_t(rows) * row_bytes);
  for (int r = 0; r < rows; ++r)
    for (int b = 0; b < row_bytes; ++b) out.push_back(tile.offset(r, b));
  return out;
}

}  // namespace llmk::testing::vocabulary
