// See masks.h.
#include "masks.h"

namespace allo {

std::vector<at::Tensor> empty_masks(const std::vector<at::Tensor>& like) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (const auto& t : like) {
    // at::empty, not empty_like: contiguous whatever the tensor's strides, and no requires_grad to carry
    out.push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
  }
  return out;
}

}  // namespace allo
