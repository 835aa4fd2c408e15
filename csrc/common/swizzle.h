// Swizzled shared-memory tiles: a tile of `rows` rows of `row_bytes` bytes (16, 32, 64, 128, 256 or
// 512: a power of two from one 16-byte chunk to an attention row of head_dim 256), stored as 16-byte chunks whose column is XORed with a function of the row, so that the
// eight 16-byte rows one ldmatrix phase reads (one chunk column, eight consecutive rows) and the
// eight chunks a quarter-warp's cp.async writes land in eight different bank groups.
//
// Shared memory serves 128 bytes (8 chunks) per wavefront, so a chunk's bank group is its chunk
// address modulo 8. With 128-byte rows, row r's chunk c is stored at chunk column c ^ (r % 8);
// with 64-byte rows (4 chunks, two rows per 128 bytes), at c ^ ((r / 2) % 4); in general at
// c ^ ((r / rows_per_128) % chunks_per_row); rows longer than 128 bytes (attention tiles) XOR only the
// low three bits of the chunk, c ^ (r % 8), which keeps each row's 128-byte groups apart. Pure host+device functions: tested on the CPU for
// being a bijection and conflict-free (tests/test_vocabulary.py).
#pragma once
#include <cstdint>

#include "common/hd_math.h"

namespace llmk {

struct SwizzledTile {
  int row_bytes;  // 16, 32, 64, 128, 256 or 512

  LLMK_HD int chunks_per_row() const { return row_bytes / 16; }
  // The stored chunk column of logical chunk `chunk` of row `row`.
  LLMK_HD int chunk_column(int row, int chunk) const {
    const int chunks = chunks_per_row();
    if (chunks >= 8) return chunk ^ (row % 8);
    const int rows_per_128 = 8 / chunks;
    return chunk ^ ((row / rows_per_128) % chunks);
  }
  // Byte offset of logical byte `byte` (0 <= byte < row_bytes) of row `row` in the tile.
  LLMK_HD int offset(int row, int byte) const {
    return row * row_bytes + chunk_column(row, byte / 16) * 16 + byte % 16;
  }
};

}  // namespace llmk
