// Many uninitialized bool masks in one call (allo/select/topk.py: one per scored tensor).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace allo {

// A contiguous bool tensor of each tensor's shape, on its device, each with its own storage. One call
// for all of them: a selection over a model allocates ~150 masks, and each torch.empty_like from
// Python costs several microseconds of host time (argument parsing, the dispatcher, a Python object),
// which the GPU spends idle when the masks are needed before the next launch.
std::vector<at::Tensor> empty_masks(const std::vector<at::Tensor>& like);

}  // namespace allo
