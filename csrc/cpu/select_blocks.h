// CPU kernel of select_blocks (DESIGN.md op 3): per query row, softmax over the compressed
// tokens of candidate blocks, block importance summed over the head group, top-n with ties
// to the lower block index. Instantiated for float, double and c10::BFloat16 (float and
// bfloat16 score in float, double in double).
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

// Writes p.out: int32 [B, L, Hk, top_n], ascending, -1 padded; all -1 for padded queries.
template <typename T>
void select_blocks_fwd(const SelectParams<T>& p);

}  // namespace cpu
}  // namespace blossom
