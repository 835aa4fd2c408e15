// Global-memory loads and stores of 1 to 16 bytes as one instruction, with cache hints, and the
// shared-memory accessors every shared access of the project's kernels goes through. Under the
// emulator each call is checked: global addresses against the launch's operands, shared addresses
// against the block's buffer, its poison, the cp.async in flight and other threads' accesses (races),
// and counted for bank conflicts.
//
//   Vec<bf16, 8> v = load_global(reinterpret_cast<const Vec<bf16, 8>*>(row) + i);   // ld.global.v4.b32
//   store_shared(tile + offset, v);                                                  // st.shared.v4.b32
#pragma once
#include <cstdint>
#include <cstring>

#include "common/device.h"

namespace llmk {

// N elements of T moved as one aligned access (N * sizeof(T) = 2, 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
  LLMK_HD T& operator[](int i) { return v[i]; }
  LLMK_HD const T& operator[](int i) const { return v[i]; }
};

namespace detail {
template <typename T>
constexpr bool is_access_size = sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16;
}

// Plain global load / store (L1 and L2 cached).
template <typename T>
LLMK_DEVICE T load_global(const T* p LLMK_SITE) {
  static_assert(detail::is_access_size<T>, "global accesses move 1, 2, 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::global_access(p, sizeof(T), false, site);
#endif
  return *p;
}

template <typename T>
LLMK_DEVICE void store_global(T* p, const T& value LLMK_SITE) {
  static_assert(detail::is_access_size<T>, "global accesses move 1, 2, 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::global_access(p, sizeof(T), true, site);
#endif
  *p = value;
}

// A load of data read once by this kernel (weights streamed through a GEMM): the read-only path,
// not kept in L1 (ld.global.nc.L1::no_allocate), so it does not evict data that is reused.
template <typename T>
LLMK_DEVICE T load_global_once(const T* p LLMK_SITE) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16, "load_global_once moves 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::global_access(p, sizeof(T), false, site);
  return *p;
#else
  T out;
  if constexpr (sizeof(T) == 16) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    memcpy(&out, &r, 16);
  } else if constexpr (sizeof(T) == 8) {
    uint2 r;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    memcpy(&out, &r, 8);
  } else {
    uint32_t r;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    memcpy(&out, &r, 4);
  }
  return out;
#endif
}

// -- shared memory ------------------------------------------------------------------------------
template <typename T>
LLMK_DEVICE T load_shared(const T* p LLMK_SITE) {
  static_assert(detail::is_access_size<T>, "shared accesses move 1, 2, 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::shared_read(p, sizeof(T), site);
#endif
  return *p;
}

template <typename T>
LLMK_DEVICE void store_shared(T* p, const T& value LLMK_SITE) {
  static_assert(detail::is_access_size<T>, "shared accesses move 1, 2, 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::shared_write(p, sizeof(T), site);
#endif
  *p = value;
}

}  // namespace llmk
