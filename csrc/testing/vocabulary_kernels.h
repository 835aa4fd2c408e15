// Test kernels for the device vocabulary (common/cp_async.h, ldmatrix.h, mma.h, swizzle.h,
// vector_io.h, warp_reduce.h): each runs one operation on inputs from global memory and writes what
// it produced (fragments, registers, landed bytes) to global memory, so tests/test_vocabulary.py can
// check it against the PTX ISA's definitions re-derived in Python and torch. The same kernels run on
// CPU tensors under the emulator and on a GPU (bench/gpu_check.sh compares the two).
//
// The entry points (vocabulary.cpp) validate the tensors and run the launchers through run_device.
// The launchers are vocabulary_kernels.cu, compiled by nvcc (CudaStream) and for the emulator
// (EmuStream).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::testing::vocabulary {

// -- entry points (vocabulary.cpp): tensors in, one launch, `stream` a cudaStream_t (0 on the CPU) ----

// d (16, 8) = a (16, K) · wᵀ + c, w (8, K): bf16/f16 (K 16, c and d f32) or int8 (K 32, c and d
// int32). One warp loads the fragments from global memory with the coordinate functions of mma.h,
// or (via_shared) through cp.async into a swizzled shared tile and ldmatrix, as a GEMM does.
void mma(const TensorView& a, const TensorView& w, const TensorView& c, const TensorView& d, bool via_shared,
         void* stream);
// rows (8 count, 8) int16: matrix j's row r is rows[8 j + r], stored in shared slot slots[8 j + r]
// (int32, distinct, in [0, 32)); lane l gives the address of slot slots[l % (8 count)]. out
// (32, count) int32: lane l's register j after ldmatrix(.trans) .x`count`.
void ldmatrix(const TensorView& rows, const TensorView& slots, const TensorView& out, int count, bool transposed,
              void* stream);
// One block of `threads` threads (source_bytes' rows). Thread t's 32-byte region of source
// (uint8, (threads, 32)) is copied by three groups of cp.async — 4 bytes at 0, 8 at 8, 16 at 16,
// with source_bytes[t] (int32, (threads, 3)) bytes read and the rest zero-filled — and each copy is
// read back right after the wait that completes its group, into out[t, 0:32] (uint8, (threads,
// 48); bytes 4..7 are not written). After a barrier, thread t reads thread (t ^ 1)'s 16-byte copy
// into out[t, 32:48]. read_early reads the 8-byte copy before its wait (a planted bug).
void cp_async(const TensorView& source, const TensorView& source_bytes, const TensorView& out, bool read_early,
              void* stream);
// sum and max (like x: float32 or int32, numel a multiple of 32): every lane's warp_sum/warp_max
// of its warp's 32 consecutive elements.
void warp_reduce(const TensorView& x, const TensorView& sum, const TensorView& max, void* stream);
// source and out: uint8 of numel 64 n · bytes. Each block of 64 threads loads 64 vectors of `bytes`
// bytes (load_global_once when once; else load_global), stores them reversed into shared memory,
// reads its own slot back and stores it: out's vector 64 b + t = source's vector 64 b + 63 - t.
void vector_copy(const TensorView& source, const TensorView& out, int bytes, bool once, void* stream);
// source (rows, row_bytes) uint8, row_bytes 64 or 128, rows a multiple of 8: one warp copies it by
// cp.async<16> into a shared tile, SwizzledTile or plain row-major, and reads it with ldmatrix.x4,
// 8 rows by 4 chunks at a time (row blocks outer, chunk quads inner). out (calls, 32, 4) int32.
void ldmatrix_tile(const TensorView& source, const TensorView& out, bool swizzled, void* stream);

// The fragment-coordinate functions of mma.h as a flat list (lane-major): (row, col) of element i of
// lane l at 2 (l · count + i). operand: "a16", "b16", "c", "a_s8", "b_s8".
std::vector<int> mma_fragment_coordinates(const std::string& operand);
// SwizzledTile{row_bytes}.offset(row, byte) for every row < rows and byte < row_bytes, row-major.
std::vector<int> swizzled_offsets(int row_bytes, int rows);

// -- the launchers (vocabulary_kernels.cu) ----------------------------------------------------------
void mma_device(DType dtype, const void* a, const void* w, const void* c, void* d, bool via_shared, CudaStream stream);
void mma_device(DType dtype, const void* a, const void* w, const void* c, void* d, bool via_shared, EmuStream stream);
void ldmatrix_device(int count, bool transposed, const void* rows, const int32_t* slots, int32_t* out,
                     CudaStream stream);
void ldmatrix_device(int count, bool transposed, const void* rows, const int32_t* slots, int32_t* out,
                     EmuStream stream);
void cp_async_device(const uint8_t* source, const int32_t* source_bytes, uint8_t* out, int threads,
                     bool read_early, CudaStream stream);
void cp_async_device(const uint8_t* source, const int32_t* source_bytes, uint8_t* out, int threads,
                     bool read_early, EmuStream stream);
void warp_reduce_device(DType dtype, const void* x, void* sum, void* max, int64_t n, CudaStream stream);
void warp_reduce_device(DType dtype, const void* x, void* sum, void* max, int64_t n, EmuStream stream);
void vector_copy_device(int bytes, bool once, const void* source, void* out, int64_t vectors, CudaStream stream);
void vector_copy_device(int bytes, bool once, const void* source, void* out, int64_t vectors, EmuStream stream);
void ldmatrix_tile_device(const uint8_t* source, int rows, int row_bytes, bool swizzled, int32_t* out,
                          CudaStream stream);
void ldmatrix_tile_device(const uint8_t* source, int rows, int row_bytes, bool swizzled, int32_t* out,
                          EmuStream stream);

}  // namespace llmk::testing::vocabulary
