// ldmatrix (sm_75+): a warp loads one, two or four 8x8 matrices of 16-bit elements from shared
// memory into the fragment layout of mma.sync (PTX ISA, "ldmatrix").
//
// Lanes 8j..8j+7 give the addresses of rows 0..7 of matrix j (16 bytes each, 16-byte aligned; for
// x1 only lanes 0-7 and for x2 lanes 0-15 are read). Register j of lane l then holds matrix j's
// elements (row l/4, columns 2(l%4) and 2(l%4)+1), the lower column in the low half; with .trans it
// holds (rows 2(l%4) and 2(l%4)+1, column l/4): the transposed matrix.
//
// Emulated: each addressing lane's 16-byte row read is checked like any shared access (bounds,
// poison, pending cp.async, races) and counted for bank conflicts (one phase per matrix).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/device.h"

namespace llmk {

namespace detail {
#if defined(LLMK_EMULATED)
template <int Count, bool Transposed>
LLMK_DEVICE void ldmatrix_emulated(uint32_t (&registers)[Count], const void* row_address, emu::Site site) {
  const int lane = emu::lane_id();
  if (lane < 8 * Count) {
    if (reinterpret_cast<uintptr_t>(row_address) % 16)
      emu::fail("ldmatrix row address not aligned to 16 bytes", site);
    emu::shared_read(row_address, 16, site);
  }
  struct Out { uint32_t r[Count]; } out;
  auto combine = [](void*, const void* const* inputs, void* const* outputs) {
    for (int l = 0; l < 8 * Count; ++l)
      if (!inputs[l]) emu::fail("ldmatrix: a lane that gives a row address has exited", emu::Site::here());
    auto row = [&](int matrix, int r) {
      return *static_cast<const uint8_t* const*>(inputs[8 * matrix + r]);
    };
    for (int l = 0; l < 32; ++l) {
      if (!outputs[l]) continue;  // exited
      Out& o = *static_cast<Out*>(outputs[l]);
      for (int j = 0; j < Count; ++j) {
        uint16_t lo, hi;
        if (!Transposed) {
          std::memcpy(&lo, row(j, l / 4) + 4 * (l % 4), 2);
          std::memcpy(&hi, row(j, l / 4) + 4 * (l % 4) + 2, 2);
        } else {
          std::memcpy(&lo, row(j, 2 * (l % 4)) + 2 * (l / 4), 2);
          std::memcpy(&hi, row(j, 2 * (l % 4) + 1) + 2 * (l / 4), 2);
        }
        o.r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  };
  const uint8_t* address = static_cast<const uint8_t*>(row_address);
  emu::warp_collective(Transposed ? "ldmatrix.trans" : "ldmatrix", 0xffffffffu, &address, &out, combine, nullptr, site);
  for (int j = 0; j < Count; ++j) registers[j] = out.r[j];
}
#endif
}  // namespace detail

// Count = 1, 2 or 4 matrices; the whole warp calls it (converged, mask 0xffffffff).
template <int Count>
LLMK_DEVICE void ldmatrix(uint32_t (&registers)[Count], const void* row_address LLMK_SITE) {
  static_assert(Count == 1 || Count == 2 || Count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(LLMK_EMULATED)
  detail::ldmatrix_emulated<Count, false>(registers, row_address, site);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (Count == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(registers[0]) : "r"(a) : "memory");
  else if constexpr (Count == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(registers[0]), "=r"(registers[1]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3]) : "r"(a) : "memory");
#endif
}

template <int Count>
LLMK_DEVICE void ldmatrix_trans(uint32_t (&registers)[Count], const void* row_address LLMK_SITE) {
  static_assert(Count == 1 || Count == 2 || Count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(LLMK_EMULATED)
  detail::ldmatrix_emulated<Count, true>(registers, row_address, site);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (Count == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(registers[0]) : "r"(a) : "memory");
  else if constexpr (Count == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(registers[0]), "=r"(registers[1]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3]) : "r"(a) : "memory");
#endif
}

}  // namespace llmk
