/* Tables for placing an unstructured weight's kept values at their columns without an expand
 * instruction (AVX2, and 16-bit values on AVX512 without VBMI2): one entry per byte of the
 * bitmask (8 columns), made at compile time. */
#ifndef PQ_CPU_UNSTRUCTURED_LUT_H
#define PQ_CPU_UNSTRUCTURED_LUT_H
#include "common.h"

namespace PQ_NS {
namespace {

/* 32-bit lanes, for vpermps over the run of 8 values at the byte's offset: lane i holds its
 * column's rank among the byte's set bits, or INT32_MIN (sign bit: blend in a zero) where
 * bit i is clear. 256 x 32 bytes. */
struct UnstructuredRankLut {
  int32_t lane[256][8];
};
constexpr UnstructuredRankLut make_unstructured_rank_lut() {
  UnstructuredRankLut t{};
  for (int b = 0; b < 256; ++b)
    for (int i = 0, r = 0; i < 8; ++i) t.lane[b][i] = (b >> i) & 1 ? r++ : INT32_MIN;
  return t;
}
alignas(32) constexpr UnstructuredRankLut kUnstructuredRankLut = make_unstructured_rank_lut();

/* Bytes, for pshufb over the run of 8 16-bit values at the byte's offset: 16-bit lane i takes
 * the bytes of value rank(i), or 0x80 0x80 (pshufb writes zeros) where bit i is clear.
 * 256 x 16 bytes. */
struct UnstructuredShuffleLut {
  uint8_t byte[256][16];
};
constexpr UnstructuredShuffleLut make_unstructured_shuffle_lut() {
  UnstructuredShuffleLut t{};
  for (int b = 0; b < 256; ++b)
    for (int i = 0, r = 0; i < 8; ++i) {
      const bool kept = (b >> i) & 1;
      t.byte[b][2 * i] = kept ? (uint8_t)(2 * r) : 0x80;
      t.byte[b][2 * i + 1] = kept ? (uint8_t)(2 * r + 1) : 0x80;
      r += kept;
    }
  return t;
}
alignas(16) constexpr UnstructuredShuffleLut kUnstructuredShuffleLut =
    make_unstructured_shuffle_lut();

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_UNSTRUCTURED_LUT_H */
