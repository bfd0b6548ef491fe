// Frame injection: after a trace, the caller's local variables that hold saved
// proxies are replaced by their values (nnsight's CONFIG.APP.FRAME_INJECTION).
#include "convert.h"

#include <Python.h>
#include <frameobject.h>

namespace fastinterleave::python {

namespace {

// Replaces, in `frame`'s locals, every proxy of `graph` whose node has a value
// in `values` ({node: value}) by that value. Returns how many were replaced.
int inject(py::handle frame, py::handle graph, py::dict values) {
  if (values.empty()) return 0;
  // 3.11: a dict snapshot of the fast locals; 3.13+ (PEP 667): a write-through proxy.
  py::object locals = frame.attr("f_locals");
  std::vector<std::pair<py::object, py::object>> writes;
  auto consider = [&](PyObject* name, PyObject* value) {
    PyObject* node = node_of_proxy(value, graph.ptr());
    if (node == nullptr) return;
    PyObject* v = PyDict_GetItemWithError(values.ptr(), node);
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return;
    }
    writes.emplace_back(py::reinterpret_borrow<py::object>(name), py::reinterpret_borrow<py::object>(v));
  };
  if (PyDict_Check(locals.ptr())) {
    PyObject *name = nullptr, *value = nullptr;
    Py_ssize_t pos = 0;
    while (PyDict_Next(locals.ptr(), &pos, &name, &value)) consider(name, value);
  } else {
    for (auto item : py::reinterpret_steal<py::list>(PyMapping_Items(locals.ptr()))) {
      auto pair = item.cast<py::tuple>();
      consider(pair[0].ptr(), pair[1].ptr());
    }
  }
  for (auto& [k, v] : writes) {
    if (PyObject_SetItem(locals.ptr(), k.ptr(), v.ptr()) != 0) throw py::error_already_set();
  }
#if PY_VERSION_HEX < 0x030D0000
  auto* f = reinterpret_cast<PyFrameObject*>(frame.ptr());
  PyCodeObject* code = PyFrame_GetCode(f);
  bool optimized = (code->co_flags & CO_OPTIMIZED) != 0;
  Py_DECREF(code);
  if (optimized) {
    // A function frame: the writes go back to its fast locals, and the snapshot is
    // dropped (it would keep every local alive, past a later `del`, until the next sync).
    if (!writes.empty()) PyFrame_LocalsToFast(f, 0);
    PyDict_Clear(locals.ptr());
  }
#endif
  return static_cast<int>(writes.size());
}

// inject(frame, graph, values), called after every trace: without the pybind11
// dispatcher's per-call work.
PyObject* inject_fast(PyObject* /*self*/, PyObject* const* a, Py_ssize_t n) {
  try {
    if (n != 3 || !PyDict_Check(a[2])) throw py::type_error("inject(frame, graph, values: dict)");
    return PyLong_FromLong(inject(a[0], a[1], py::reinterpret_borrow<py::dict>(a[2])));
  } catch (...) {
    raise_current();
  }
  return nullptr;
}

PyMethodDef g_inject_def = {
    "inject", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&inject_fast)), METH_FASTCALL,
    "inject(frame, graph, values) -> int: replaces the frame's locals holding saved proxies of `graph` by "
    "their values ({node: value}); returns how many."};

}  // namespace

void register_frames(py::module_& m) {
  m.add_object("inject", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&g_inject_def, nullptr, nullptr)));
}

}  // namespace fastinterleave::python
