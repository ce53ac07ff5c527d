// See step_plan.h.
#include "step_plan.h"

#include <stdexcept>

namespace py = pybind11;

namespace allo {

namespace {

constexpr int kStateKeys = 4;  // exp_avg, exp_avg_sq (required), indices, master (optional)
constexpr int kRequiredKeys = 2;

// A borrowed item of a dict, or nullptr when absent; a lookup that raised (a key's __hash__) throws.
PyObject* dict_item(PyObject* dict, PyObject* key) {
  PyObject* item = PyDict_GetItemWithError(dict, key);
  if (item == nullptr && PyErr_Occurred()) {
    throw py::error_already_set();
  }
  return item;
}

}  // namespace

py::object plan_gradients(const py::list& params, const py::list& states, const py::list& state_tensors,
                          const std::vector<int64_t>& weight_ptrs, const py::list& grad_dtypes,
                          const std::vector<bool>& compact_entry, const py::dict& compact) {
  const size_t n = params.size();
  if (states.size() != n || state_tensors.size() != n || weight_ptrs.size() != n || grad_dtypes.size() != n ||
      compact_entry.size() != n) {
    throw std::invalid_argument("plan_gradients: params, states, state_tensors, weight_ptrs, grad_dtypes and "
                                "compact_entry must have one item per plan entry");
  }
  const py::str keys[kStateKeys] = {py::str("exp_avg"), py::str("exp_avg_sq"), py::str("indices"),
                                    py::str("master")};
  const py::str grad_name("grad"), dtype_name("dtype");
  const bool any_compact = PyDict_Size(compact.ptr()) > 0;
  py::list grads(n);  // (items NULL until set: a list dropped early releases only those set)
  at::Tensor ptrs = at::empty({static_cast<int64_t>(n)}, at::kLong);
  int64_t* out = ptrs.data_ptr<int64_t>();

  for (size_t i = 0; i < n; ++i) {
    PyObject* state = PyList_GET_ITEM(states.ptr(), i);
    PyObject* expected = PyList_GET_ITEM(state_tensors.ptr(), i);
    if (!PyDict_Check(state) || !PyTuple_Check(expected) || PyTuple_GET_SIZE(expected) != kStateKeys) {
      throw std::invalid_argument("plan_gradients: states must be dicts and state_tensors 4-tuples");
    }
    for (int k = 0; k < kStateKeys; ++k) {
      PyObject* got = dict_item(state, keys[k].ptr());
      if (got == nullptr) {
        if (k < kRequiredKeys) {
          PyErr_SetObject(PyExc_KeyError, keys[k].ptr());
          throw py::error_already_set();
        }
        got = Py_None;
      }
      if (got != PyTuple_GET_ITEM(expected, k)) {
        return py::none();  // a state tensor replaced: the launch tables hold the old one's address
      }
    }

    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    py::object grad;
    if (compact_entry[i]) {
      PyObject* taken = dict_item(compact.ptr(), param);
      if (taken == nullptr) {
        return py::none();
      }
      grad = py::reinterpret_borrow<py::object>(taken);
    } else {
      grad = py::reinterpret_steal<py::object>(PyObject_GetAttr(param, grad_name.ptr()));
      if (!grad) {
        throw py::error_already_set();
      }
      if (grad.is_none()) {
        return py::none();
      }
      if (any_compact) {  // a parameter that has since moved to compact gradients
        const int has = PyDict_Contains(compact.ptr(), param);
        if (has < 0) {
          throw py::error_already_set();
        }
        if (has) {
          return py::none();
        }
      }
    }
    if (!THPVariable_Check(grad.ptr()) || !THPVariable_Check(param)) {
      return py::none();
    }
    // dtypes are singletons: compared by identity, as the Python path's == does for them
    const py::object dtype = py::reinterpret_steal<py::object>(PyObject_GetAttr(grad.ptr(), dtype_name.ptr()));
    if (!dtype) {
      throw py::error_already_set();
    }
    if (dtype.ptr() != PyList_GET_ITEM(grad_dtypes.ptr(), i)) {
      return py::none();
    }
    const at::Tensor& g = THPVariable_Unpack(grad.ptr());
    if (!compact_entry[i] && (g.is_sparse() || !g.is_contiguous())) {
      return py::none();
    }
    const at::Tensor& w = THPVariable_Unpack(param);
    if (reinterpret_cast<int64_t>(w.data_ptr()) != weight_ptrs[i] || !w.is_contiguous()) {
      return py::none();  // the weight moved, or is now a strided view (the kernels use flat offsets)
    }
    out[i] = reinterpret_cast<int64_t>(g.data_ptr());
    PyList_SET_ITEM(grads.ptr(), i, grad.release().ptr());
  }
  return py::make_tuple(std::move(grads), ptrs);
}

}  // namespace allo
