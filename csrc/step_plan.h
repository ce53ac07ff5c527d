// The per-parameter checks of a replayed MaskedAdamW step (allo/optim/step_plan.py), in one call.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace allo {

// For each entry i of a step plan: checks that states[i]'s "exp_avg", "exp_avg_sq", "indices" and
// "master" are the objects in state_tensors[i] (a 4-tuple; None for an absent optional key), fetches the
// gradient (params[i].grad, or compact[params[i]] where compact_entry[i]) and checks that it exists, has
// the dtype object grad_dtypes[i], is neither sparse nor non-contiguous (full gradients), that a full
// gradient's parameter is not in `compact`, and that params[i] is still contiguous at weight_ptrs[i].
// Returns (list of gradients, int64 CPU tensor of their data pointers), or None as soon as a check fails
// (the plan no longer holds). A state without "exp_avg" or "exp_avg_sq" raises KeyError, as indexing it
// in Python does. The Python loop doing the same cost ~1-2 us a parameter: 0.1-0.3 ms of host time before
// the kernel of a 144-tensor step, which a 10% row mask's update takes ~1 ms to run on an H100.
pybind11::object plan_gradients(const pybind11::list& params, const pybind11::list& states,
                                const pybind11::list& state_tensors, const std::vector<int64_t>& weight_ptrs,
                                const pybind11::list& grad_dtypes, const std::vector<bool>& compact_entry,
                                const pybind11::dict& compact);

}  // namespace allo
