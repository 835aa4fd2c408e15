// The device vocabulary's test kernels (vocabulary_kernels.h); also compiled for the emulated
// backend (docs/emulator.md). Each kernel is one warp (or a few) doing one vocabulary operation on
// global inputs and writing what it got to global memory: tests/test_vocabulary.py checks that
// against an independent model (the PTX ISA's tables in Python, torch), and bench/gpu_check.sh the
// GPU's output against the emulator's. Shared memory only through dynamic_shared_memory() and the
// vocabulary's accessors, global memory only through load_global/store_global & co.
#include <cstdint>
#include <string>
#include <vector>

#include "common/cp_async.h"
#include "common/float_types.h"
#include "common/launch.h"
#include "common/ldmatrix.h"
#include "common/mma.h"
#include "common/swizzle.h"
#include "common/vector_io.h"
#include "common/warp_reduce.h"
#include "core/errors.h"
#include "testing/vocabulary_kernels.h"

namespace llmk::testing::vocabulary {
namespace {

// -- mma ------------------------------------------------------------------------------------------
// A (16 rows) and W (8 rows) both have rows of 32 bytes: 16 bf16/f16 or 32 int8 elements.
constexpr int kRowBytes = 32;
constexpr int kTileABytes = 16 * kRowBytes;
constexpr int kTileWBytes = 8 * kRowBytes;

template <typename T> LLMK_DEVICE uint32_t element_bits(T x) { return uint32_t(x.bits); }
template <> LLMK_DEVICE uint32_t element_bits<int8_t>(int8_t x) { return uint32_t(uint8_t(x)); }

// The fragments straight from global memory, element by element, with mma.h's coordinate functions:
// element i of a register of E elements sits at bits (i % E) * (32 / E).
template <typename T>
LLMK_DEVICE void load_fragments_direct(const T* a, const T* w, uint32_t (&af)[4], uint32_t (&bf)[2], int lane) {
  constexpr bool kInt8 = sizeof(T) == 1;
  constexpr int kPerRegister = kInt8 ? 4 : 2;
  constexpr int kRowElements = kRowBytes / int(sizeof(T));
  constexpr int kBits = 32 / kPerRegister;
  for (int r = 0; r < 4; ++r) af[r] = 0;
  for (int r = 0; r < 2; ++r) bf[r] = 0;
  for (int i = 0; i < 4 * kPerRegister; ++i) {
    const FragmentCoord p = kInt8 ? mma_a_coord_s8(lane, i) : mma_a_coord_16bit(lane, i);
    af[i / kPerRegister] |= element_bits(load_global(a + p.row * kRowElements + p.col)) << (kBits * (i % kPerRegister));
  }
  for (int i = 0; i < 2 * kPerRegister; ++i) {
    const FragmentCoord p = kInt8 ? mma_b_coord_s8(lane, i) : mma_b_coord_16bit(lane, i);  // (k, n)
    // B = Wᵀ: B[k][n] = W[n][k]
    bf[i / kPerRegister] |= element_bits(load_global(w + p.col * kRowElements + p.row)) << (kBits * (i % kPerRegister));
  }
}

// The GEMM path: global -> cp.async<16> -> swizzled shared tiles -> ldmatrix. A's ldmatrix.x4 reads
// matrices (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 1):
// registers a0..a3 of the fragment (mma.h). W's ldmatrix.x2 reads (rows 0-7, chunk 0) and
// (rows 0-7, chunk 1): b0 and b1 (W's row is B's column). The same bytes serve both element types.
template <typename T>
LLMK_DEVICE void load_fragments_via_shared(const T* a, const T* w, uint32_t (&af)[4], uint32_t (&bf)[2], int lane) {
  uint8_t* shared = dynamic_shared_memory();
  uint8_t* tile_a = shared;
  uint8_t* tile_w = shared + kTileABytes;
  const SwizzledTile tile{kRowBytes};
  const uint8_t* a_bytes = reinterpret_cast<const uint8_t*>(a);
  const uint8_t* w_bytes = reinterpret_cast<const uint8_t*>(w);
  {  // A: 32 chunks of 16 bytes, one per lane, in row-major order
    const int row = lane / 2, chunk = lane % 2;
    llmk::cp_async<16>(tile_a + tile.offset(row, 16 * chunk), a_bytes + row * kRowBytes + 16 * chunk, 16);
  }
  if (lane < 16) {  // W: 16 chunks
    const int row = lane / 2, chunk = lane % 2;
    llmk::cp_async<16>(tile_w + tile.offset(row, 16 * chunk), w_bytes + row * kRowBytes + 16 * chunk, 16);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  {
    const int matrix = lane / 8;
    const int row = lane % 8 + 8 * (matrix % 2), chunk = matrix / 2;
    llmk::ldmatrix(af, tile_a + tile.offset(row, 16 * chunk));
  }
  {
    const int matrix = (lane / 8) % 2;  // lanes 16-31 give addresses x2 ignores: repeat lanes 0-15's
    llmk::ldmatrix(bf, tile_w + tile.offset(lane % 8, 16 * matrix));
  }
}

template <typename T, bool ViaShared>
__global__ void mma16_kernel(const T* a, const T* w, const float* c, float* d) {
  const int lane = int(threadIdx.x);
  uint32_t af[4], bf[2];
  if constexpr (ViaShared) load_fragments_via_shared(a, w, af, bf, lane);
  else load_fragments_direct(a, w, af, bf, lane);
  float cf[4], df[4];
  for (int i = 0; i < 4; ++i) {
    const FragmentCoord p = mma_c_coord(lane, i);
    cf[i] = load_global(c + p.row * 8 + p.col);
  }
  mma_m16n8k16<T>(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) {
    const FragmentCoord p = mma_c_coord(lane, i);
    store_global(d + p.row * 8 + p.col, df[i]);
  }
}

template <bool ViaShared>
__global__ void mma_s8_kernel(const int8_t* a, const int8_t* w, const int32_t* c, int32_t* d) {
  const int lane = int(threadIdx.x);
  uint32_t af[4], bf[2];
  if constexpr (ViaShared) load_fragments_via_shared(a, w, af, bf, lane);
  else load_fragments_direct(a, w, af, bf, lane);
  int32_t cf[4], df[4];
  for (int i = 0; i < 4; ++i) {
    const FragmentCoord p = mma_c_coord(lane, i);
    cf[i] = load_global(c + p.row * 8 + p.col);
  }
  mma_m16n8k32_s8(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) {
    const FragmentCoord p = mma_c_coord(lane, i);
    store_global(d + p.row * 8 + p.col, df[i]);
  }
}

// -- ldmatrix -------------------------------------------------------------------------------------
using Row16 = Vec<int16_t, 8>;  // one 16-byte row of an 8x8 matrix of 16-bit elements

template <int Count, bool Transposed>
__global__ void ldmatrix_kernel(const Row16* rows, const int32_t* slots, int32_t* out) {
  const int lane = int(threadIdx.x);
  Row16* tile = reinterpret_cast<Row16*>(dynamic_shared_memory());  // 32 slots
  for (int r = lane; r < 8 * Count; r += 32) store_shared(tile + (load_global(slots + r) & 31), load_global(rows + r));
  __syncthreads();
  uint32_t registers[Count];
  const Row16* address = tile + (load_global(slots + lane % (8 * Count)) & 31);
  if constexpr (Transposed) llmk::ldmatrix_trans(registers, address);
  else llmk::ldmatrix(registers, address);
  for (int j = 0; j < Count; ++j) store_global(out + lane * Count + j, int32_t(registers[j]));
}

// -- cp.async -------------------------------------------------------------------------------------
constexpr int kRegionBytes = 32;  // per thread, in the source and in shared memory
constexpr int kOutBytes = 48;     // per thread: its region, then its neighbour's 16-byte copy

// ReadEarly is a template argument, not a branch: ptxas may hoist a shared load above a branch and
// merge it with the 4-byte load before it, which then reads the 8-byte group in flight whatever the
// flag (racecheck on an H200 reported exactly that, 8 bytes a thread, 2026-11-27).
template <bool ReadEarly>
__global__ void cp_async_kernel(const uint8_t* source, const int32_t* source_bytes, uint8_t* out) {
  const int t = int(threadIdx.x);
  uint8_t* region = dynamic_shared_memory() + t * kRegionBytes;
  const uint8_t* from = source + t * kRegionBytes;
  uint8_t* to = out + t * kOutBytes;
  llmk::cp_async<4>(region, from, load_global(source_bytes + 3 * t));
  cp_async_commit();
  llmk::cp_async<8>(region + 8, from + 8, load_global(source_bytes + 3 * t + 1));
  cp_async_commit();
  llmk::cp_async<16>(region + 16, from + 16, load_global(source_bytes + 3 * t + 2));
  cp_async_commit();
  cp_async_wait<2>();  // the 4-byte group has landed; two groups in flight
  store_global(reinterpret_cast<uint32_t*>(to), load_shared(reinterpret_cast<const uint32_t*>(region)));
  if constexpr (ReadEarly)  // the bug: the 8-byte group may still be in flight
    store_global(reinterpret_cast<Vec<uint32_t, 2>*>(to + 8), load_shared(reinterpret_cast<const Vec<uint32_t, 2>*>(region + 8)));
  cp_async_wait<1>();
  store_global(reinterpret_cast<Vec<uint32_t, 2>*>(to + 8), load_shared(reinterpret_cast<const Vec<uint32_t, 2>*>(region + 8)));
  cp_async_wait<0>();
  store_global(reinterpret_cast<Vec<uint32_t, 4>*>(to + 16), load_shared(reinterpret_cast<const Vec<uint32_t, 4>*>(region + 16)));
  __syncthreads();  // other threads' landed copies are visible after their waits and a barrier
  const uint8_t* neighbour = dynamic_shared_memory() + (t ^ 1) * kRegionBytes;
  store_global(reinterpret_cast<Vec<uint32_t, 4>*>(to + 32), load_shared(reinterpret_cast<const Vec<uint32_t, 4>*>(neighbour + 16)));
}

// -- warp reductions ------------------------------------------------------------------------------
template <typename T>
__global__ void warp_reduce_kernel(const T* x, T* sum, T* max) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const T v = load_global(x + i);
  store_global(sum + i, warp_sum(v));
  store_global(max + i, warp_max(v));
}

// -- vector loads and stores ----------------------------------------------------------------------
constexpr int kCopyThreads = 64;

template <int Bytes, bool Once>
__global__ void vector_copy_kernel(const Vec<uint8_t, Bytes>* source, Vec<uint8_t, Bytes>* out) {
  using V = Vec<uint8_t, Bytes>;
  const int t = int(threadIdx.x);
  const int64_t i = int64_t(blockIdx.x) * kCopyThreads + t;
  V v;
  if constexpr (Once) v = load_global_once(source + i);
  else v = load_global(source + i);
  V* tile = reinterpret_cast<V*>(dynamic_shared_memory());
  store_shared(tile + (kCopyThreads - 1 - t), v);
  __syncthreads();
  store_global(out + i, load_shared(tile + t));
}

// -- ldmatrix from a (swizzled) tile ----------------------------------------------------------------
LLMK_DEVICE int tile_offset(int row, int byte, int row_bytes, bool swizzled) {
  return swizzled ? SwizzledTile{row_bytes}.offset(row, byte) : row * row_bytes + byte;
}

__global__ void ldmatrix_tile_kernel(const uint8_t* source, int rows, int row_bytes, int swizzled, int32_t* out) {
  const int lane = int(threadIdx.x);
  uint8_t* tile = dynamic_shared_memory();
  const int chunks = row_bytes / 16;
  for (int q = lane; q < rows * chunks; q += 32)  // chunk q of the tile in row-major order
    llmk::cp_async<16>(tile + tile_offset(q / chunks, 16 * (q % chunks), row_bytes, swizzled != 0), source + 16 * q, 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  int call = 0;
  for (int row_block = 0; row_block < rows / 8; ++row_block) {
    for (int first_chunk = 0; first_chunk < chunks; first_chunk += 4, ++call) {
      uint32_t registers[4];
      const int row = 8 * row_block + lane % 8, chunk = first_chunk + lane / 8;
      llmk::ldmatrix(registers, tile + tile_offset(row, 16 * chunk, row_bytes, swizzled != 0));
      for (int j = 0; j < 4; ++j) store_global(out + (call * 32 + lane) * 4 + j, int32_t(registers[j]));
    }
  }
}

LaunchShape one_warp(size_t shared_bytes = 0) { return LaunchShape{dim3(1), dim3(32), shared_bytes}; }

}  // namespace

void mma_device(DType dtype, const void* a, const void* w, const void* c, void* d, bool via_shared, DeviceStream stream) {
  const size_t shared = via_shared ? kTileABytes + kTileWBytes : 0;
  auto run16 = [&](auto element) {
    using T = decltype(element);
    const T* at = static_cast<const T*>(a);
    const T* wt = static_cast<const T*>(w);
    const float* ct = static_cast<const float*>(c);
    float* dt = static_cast<float*>(d);
    if (via_shared) launch("vocabulary mma_m16n8k16 via shared", mma16_kernel<T, true>, one_warp(shared), stream, at, wt, ct, dt);
    else launch("vocabulary mma_m16n8k16", mma16_kernel<T, false>, one_warp(), stream, at, wt, ct, dt);
  };
  switch (dtype) {
    case DType::bf16: run16(bf16{}); return;
    case DType::f16: run16(f16{}); return;
    case DType::i8: {
      const int8_t* at = static_cast<const int8_t*>(a);
      const int8_t* wt = static_cast<const int8_t*>(w);
      const int32_t* ct = static_cast<const int32_t*>(c);
      int32_t* dt = static_cast<int32_t*>(d);
      if (via_shared) launch("vocabulary mma_m16n8k32_s8 via shared", mma_s8_kernel<true>, one_warp(shared), stream, at, wt, ct, dt);
      else launch("vocabulary mma_m16n8k32_s8", mma_s8_kernel<false>, one_warp(), stream, at, wt, ct, dt);
      return;
    }
    default: throw ValueError("mma_device takes bf16, f16 or int8");
  }
}

void ldmatrix_device(int count, bool transposed, const void* rows, const int32_t* slots, int32_t* out,
                     DeviceStream stream) {
  const Row16* r = static_cast<const Row16*>(rows);
  const LaunchShape shape = one_warp(32 * sizeof(Row16));
  const char* name = transposed ? "vocabulary ldmatrix_trans" : "vocabulary ldmatrix";
  if (count == 1 && !transposed) launch(name, ldmatrix_kernel<1, false>, shape, stream, r, slots, out);
  else if (count == 2 && !transposed) launch(name, ldmatrix_kernel<2, false>, shape, stream, r, slots, out);
  else if (count == 4 && !transposed) launch(name, ldmatrix_kernel<4, false>, shape, stream, r, slots, out);
  else if (count == 1) launch(name, ldmatrix_kernel<1, true>, shape, stream, r, slots, out);
  else if (count == 2) launch(name, ldmatrix_kernel<2, true>, shape, stream, r, slots, out);
  else if (count == 4) launch(name, ldmatrix_kernel<4, true>, shape, stream, r, slots, out);
  else throw ValueError("ldmatrix loads 1, 2 or 4 matrices");
}

void cp_async_device(const uint8_t* source, const int32_t* source_bytes, uint8_t* out, int threads,
                     bool read_early, DeviceStream stream) {
  const LaunchShape shape{dim3(1), dim3(unsigned(threads)), size_t(threads) * kRegionBytes};
  if (read_early) launch("vocabulary cp_async reading early", cp_async_kernel<true>, shape, stream, source, source_bytes, out);
  else launch("vocabulary cp_async", cp_async_kernel<false>, shape, stream, source, source_bytes, out);
}

void warp_reduce_device(DType dtype, const void* x, void* sum, void* max, int64_t n, DeviceStream stream) {
  const unsigned threads = n % 128 == 0 ? 128 : 32;
  const LaunchShape shape{dim3(unsigned(n / threads)), dim3(threads), 0};
  if (dtype == DType::f32)
    launch("vocabulary warp_reduce", warp_reduce_kernel<float>, shape, stream, static_cast<const float*>(x),
           static_cast<float*>(sum), static_cast<float*>(max));
  else if (dtype == DType::i32)
    launch("vocabulary warp_reduce", warp_reduce_kernel<int32_t>, shape, stream, static_cast<const int32_t*>(x),
           static_cast<int32_t*>(sum), static_cast<int32_t*>(max));
  else
    throw ValueError("warp_reduce_device takes float32 or int32");
}

void vector_copy_device(int bytes, bool once, const void* source, void* out, int64_t vectors, DeviceStream stream) {
  const LaunchShape shape{dim3(unsigned(vectors / kCopyThreads)), dim3(kCopyThreads), size_t(kCopyThreads) * bytes};
  auto run = [&](auto bytes_constant, auto once_constant) {
    constexpr int B = decltype(bytes_constant)::value;
    constexpr bool O = decltype(once_constant)::value;
    using V = Vec<uint8_t, B>;
    launch(O ? "vocabulary load_global_once" : "vocabulary load_global", vector_copy_kernel<B, O>, shape, stream,
           static_cast<const V*>(source), static_cast<V*>(out));
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (once) {
    if (bytes == 4) run(std::integral_constant<int, 4>{}, Yes{});
    else if (bytes == 8) run(std::integral_constant<int, 8>{}, Yes{});
    else if (bytes == 16) run(std::integral_constant<int, 16>{}, Yes{});
    else throw ValueError("load_global_once moves 4, 8 or 16 bytes");
  } else {
    if (bytes == 1) run(std::integral_constant<int, 1>{}, No{});
    else if (bytes == 2) run(std::integral_constant<int, 2>{}, No{});
    else if (bytes == 4) run(std::integral_constant<int, 4>{}, No{});
    else if (bytes == 8) run(std::integral_constant<int, 8>{}, No{});
    else if (bytes == 16) run(std::integral_constant<int, 16>{}, No{});
    else throw ValueError("load_global moves 1, 2, 4, 8 or 16 bytes");
  }
}

void ldmatrix_tile_device(const uint8_t* source, int rows, int row_bytes, bool swizzled, int32_t* out,
                          DeviceStream stream) {
  launch(swizzled ? "vocabulary ldmatrix swizzled tile" : "vocabulary ldmatrix plain tile", ldmatrix_tile_kernel,
         one_warp(size_t(rows) * row_bytes), stream, source, rows, row_bytes, int(swizzled), out);
}

#if defined(LLMK_EMULATED)
// Host code, defined once (in the emulated compilation, which every build has): the coordinate
// functions are host+device, but mma.h needs the device headers.
std::vector<int> mma_fragment_coordinates(const std::string& operand) {
  FragmentCoord (*coordinate)(int, int) = nullptr;
  int count = 0;
  if (operand == "a16") coordinate = mma_a_coord_16bit, count = 8;
  else if (operand == "b16") coordinate = mma_b_coord_16bit, count = 4;
  else if (operand == "c") coordinate = mma_c_coord, count = 4;
  else if (operand == "a_s8") coordinate = mma_a_coord_s8, count = 16;
  else if (operand == "b_s8") coordinate = mma_b_coord_s8, count = 8;
  else throw ValueError("operand must be one of a16, b16, c, a_s8, b_s8; got '" + operand + "'");
  std::vector<int> out;
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < count; ++i) {
      const FragmentCoord p = coordinate(lane, i);
      out.push_back(p.row);
      out.push_back(p.col);
    }
  return out;
}
#endif

}  // namespace llmk::testing::vocabulary
