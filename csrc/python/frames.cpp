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
  PyObject* proxy_type = proxy_type_object();
  // 3.11: a dict snapshot of the fast locals; 3.13+ (PEP 667): a write-through proxy.
  py::object locals = frame.attr("f_locals");
  std::vector<std::pair<py::object, py::object>> writes;
  for (auto item : py::reinterpret_steal<py::list>(PyMapping_Items(locals.ptr()))) {
    auto pair = item.cast<py::tuple>();
    py::handle value = pair[1];
    if (Py_TYPE(value.ptr()) != reinterpret_cast<PyTypeObject*>(proxy_type)) continue;
    if (value.attr("_graph").ptr() != graph.ptr()) continue;
    PyObject* v = PyDict_GetItemWithError(values.ptr(), value.attr("_node").ptr());
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      continue;
    }
    writes.emplace_back(pair[0], py::reinterpret_borrow<py::object>(v));
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

}  // namespace

void register_frames(py::module_& m) {
  m.def("inject", &inject, py::arg("frame"), py::arg("graph"), py::arg("values"));
}

}  // namespace fastinterleave::python
