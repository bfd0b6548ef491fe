// Python <-> engine values. The engine sees tensors, scalars, tuples, lists,
// string-keyed dicts and records; everything else travels as an opaque capsule.
#pragma once

#include <fastinterleave/graph.h>

#include <pybind11/pybind11.h>

namespace fastinterleave::python {

namespace py = pybind11;

// A Python object the engine carries without looking inside (and, for records,
// the Python class to rebuild).
struct PyObjectHolder : torch::CustomClassHolder {
  explicit PyObjectHolder(py::object o) : obj(std::move(o)) {}
  ~PyObjectHolder() override;
  py::object obj;
};

c10::IValue to_ivalue(py::handle obj);
// A Python result (of a fallback node): like to_ivalue, but mutable containers
// stay opaque so Python code can keep changing the same object.
c10::IValue result_to_ivalue(py::handle obj);
// `like` (optional) is the Python value this one replaces: its tuple subclass
// (namedtuple, torch.Size) is kept.
py::object to_python(const c10::IValue& value, py::handle like = py::handle());

// Recorded arguments: proxies of `graph` become Refs; proxies of a finished
// trace give their value.
void set_proxy_type(py::handle type);
Arg to_arg(py::handle obj, py::handle graph);
// The node id (borrowed) of `obj` when it is a Proxy of `graph`, else null.
PyObject* node_of_proxy(PyObject* obj, PyObject* graph);

// Inside a catch block of a function called without pybind11's dispatcher
// (METH_FASTCALL): raises the exception being handled in Python, as pybind11
// and the engine's translator would.
void raise_current();
py::object arg_to_python(const Arg& resolved);

// Functions called once per trace or per node, without the pybind11
// dispatcher's per-call work: `Body(args, nargs)` returns the result or throws,
// and its errors are raised as pybind11 would raise them.
using FastBody = py::object (*)(PyObject* const* args, Py_ssize_t nargs);

template <FastBody Body>
PyObject* fast_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  try {
    return Body(args, nargs).release().ptr();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

template <FastBody Body>
PyMethodDef fast_function(const char* name, const char* doc) {
  return {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_call<Body>)), METH_FASTCALL, doc};
}

// Adds `def` (static: it must outlive the module) to `m`.
void add_fast_function(py::module_& m, PyMethodDef* def);

}  // namespace fastinterleave::python
