// The caller's frames. Frame injection: after a trace, the caller's local
// variables that hold saved proxies are replaced by their values (nnsight's
// CONFIG.APP.FRAME_INJECTION). Lines: each recorded node keeps the user's
// source line that recorded it, for errors.
#include "convert.h"

#include <Python.h>
#include <frameobject.h>

#include <unordered_map>

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

// inject(frame, graph, values), called after every trace.
py::object inject_call(PyObject* const* a, Py_ssize_t n) {
  if (n != 3 || !PyDict_Check(a[2])) throw py::type_error("inject(frame, graph, values: dict)");
  return py::int_(inject(a[0], a[1], py::reinterpret_borrow<py::dict>(a[2])));
}

PyMethodDef g_inject_def = fast_function<inject_call>(
    "inject",
    "inject(frame, graph, values) -> int: replaces the frame's locals holding saved proxies of `graph` by "
    "their values ({node: value}); returns how many.");

// -- the user's source line of each recorded node ------------------------------

// Files whose frames are not the user's (fastinterleave's and torch's): the
// directory prefixes, and each file's answer once known (per filename object,
// kept alive; dropped all at once past a bound, like the locations below).
PyObject* g_skip_dirs = nullptr;  // tuple of str (owned; kept to the end of the process)
std::unordered_map<PyObject*, bool> g_skip_files;  // filename -> skipped

// "file:line" per (code, instruction offset), for traces recorded again (a loop,
// a sweep): PyFrame_GetLineNumber decodes the code's line table from its start on
// every call. The entries keep their code objects (so an address is not reused
// while its entry lives) and are dropped all at once past a bound.
struct LocationKey {
  PyObject* code;
  int lasti;
  bool operator==(const LocationKey& o) const { return code == o.code && lasti == o.lasti; }
};
struct LocationHash {
  size_t operator()(const LocationKey& k) const {
    return std::hash<const void*>()(k.code) ^ (static_cast<size_t>(k.lasti) * 0x9E3779B97F4A7C15ULL);
  }
};
std::unordered_map<LocationKey, PyObject*, LocationHash> g_locations;  // -> str (owned)
constexpr size_t kMaxEntries = 4096;  // of each cache

void clear_locations() {
  for (auto& [key, location] : g_locations) {
    Py_DECREF(key.code);
    Py_DECREF(location);
  }
  g_locations.clear();
}

void clear_skip_files() {
  for (auto& [filename, skip] : g_skip_files) Py_DECREF(filename);
  g_skip_files.clear();
}

bool skipped_file(PyObject* filename) {
  auto found = g_skip_files.find(filename);
  if (found != g_skip_files.end()) return found->second;
  bool skip = false;
  if (g_skip_dirs != nullptr && PyUnicode_Check(filename)) {
    const Py_ssize_t n = PyTuple_GET_SIZE(g_skip_dirs);
    for (Py_ssize_t i = 0; i < n && !skip; ++i) {
      const Py_ssize_t r = PyUnicode_Tailmatch(filename, PyTuple_GET_ITEM(g_skip_dirs, i), 0, PY_SSIZE_T_MAX, -1);
      if (r < 0) throw py::error_already_set();
      skip = r == 1;
    }
  }
  if (g_skip_files.size() >= kMaxEntries) clear_skip_files();
  Py_INCREF(filename);
  g_skip_files.emplace(filename, skip);
  return skip;
}

// "file:line" of the first frame outside fastinterleave and torch (borrowed), or
// null when there is none.
PyObject* user_location() {
  PyFrameObject* frame = PyEval_GetFrame();  // borrowed
  Py_XINCREF(frame);
  while (frame != nullptr) {
    PyCodeObject* code = PyFrame_GetCode(frame);
    bool skip = false;
    try {
      skip = skipped_file(code->co_filename);
    } catch (...) {
      Py_DECREF(code);
      Py_DECREF(frame);
      throw;
    }
    if (!skip) {
      const LocationKey key{reinterpret_cast<PyObject*>(code), PyFrame_GetLasti(frame)};
      auto found = g_locations.find(key);
      PyObject* location = nullptr;
      if (found != g_locations.end()) {
        location = found->second;
        Py_DECREF(code);
      } else {
        if (g_locations.size() >= kMaxEntries) clear_locations();
        location = PyUnicode_FromFormat("%U:%d", code->co_filename, PyFrame_GetLineNumber(frame));
        if (location == nullptr) {
          Py_DECREF(code);
          Py_DECREF(frame);
          throw py::error_already_set();
        }
        g_locations.emplace(key, location);  // keeps `code`'s reference
      }
      Py_DECREF(frame);
      return location;
    }
    Py_DECREF(code);
    PyFrameObject* back = PyFrame_GetBack(frame);
    Py_DECREF(frame);
    frame = back;
  }
  return nullptr;
}

// line_index(index: dict, lines: list) -> int: the index in `lines` of the user's
// source line running now (appended when new; `index` maps a line to its index),
// -1 when no frame is the user's.
py::object line_index_call(PyObject* const* a, Py_ssize_t n) {
  if (n != 2 || !PyDict_Check(a[0]) || !PyList_Check(a[1])) throw py::type_error("line_index(index: dict, lines: list)");
  PyObject* location = user_location();
  if (location == nullptr) return py::int_(-1);
  PyObject* index = PyDict_GetItemWithError(a[0], location);
  if (index != nullptr) return py::reinterpret_borrow<py::object>(index);
  if (PyErr_Occurred()) throw py::error_already_set();
  py::int_ fresh(PyList_GET_SIZE(a[1]));
  if (PyDict_SetItem(a[0], location, fresh.ptr()) != 0 || PyList_Append(a[1], location) != 0) {
    throw py::error_already_set();
  }
  return std::move(fresh);
}

PyMethodDef g_line_index_def = fast_function<line_index_call>(
    "line_index",
    "line_index(index, lines) -> int: the index in `lines` of the user's source line running now (the first "
    "frame outside the directories given to set_skipped_dirs), appended when new; -1 when there is none.");

void set_skipped_dirs(py::tuple dirs) {
  Py_XDECREF(g_skip_dirs);
  g_skip_dirs = dirs.inc_ref().ptr();
  clear_skip_files();
  clear_locations();
}

}  // namespace

void register_frames(py::module_& m) {
  add_fast_function(m, &g_inject_def);
  add_fast_function(m, &g_line_index_def);
  m.def("set_skipped_dirs", &set_skipped_dirs, py::arg("dirs"),
        "Directories whose files' frames are not the user's, for line_index (fastinterleave's and torch's).");
}

}  // namespace fastinterleave::python
