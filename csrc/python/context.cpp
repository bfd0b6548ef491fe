// The `with` blocks of traces, edits and sessions, entered and left in C.
//
// Opening one changes state that outlives it: the model's open trace (a
// ContextVar, so another thread or asyncio task never sees it), the stack of
// open blocks (a ContextVar too), torch's tensor factories (patched while any
// block records) and the garbage collector (paused while a trace records and
// runs). A KeyboardInterrupt lands between two bytecodes; here there are none
// between these changes, and none between __enter__ returning and the `with`
// block owning the exit: every path undoes exactly what was done.
//
// _C.Context is the base class; a subclass gives
//   _var        the ContextVar holding the open block of its kind for its model,
//   _pauses_gc  whether the collector is paused while it is open,
//   _refuse(open)   raises: the model already has an open block of this kind,
//   _enter()        the Python part of entering (its result is `with`'s target),
//   _exit(t, e, tb) the Python part of leaving (running the model), called once
//                   the state above is undone; the collector resumes after it.
#include <pybind11/pybind11.h>

#include <structmember.h>

#include <array>

namespace py = pybind11;

namespace fastinterleave::python {

namespace {

// Process-wide, under the GIL.
struct State {
  PyObject* open_var = nullptr;  // ContextVar: the tuple of open blocks, innermost last
  PyObject* patches = nullptr;   // list of (namespace dict, recording dict, original dict)
  int patch_depth = 0;
  int gc_depth = 0;
  bool gc_was_enabled = false;
} g_state;

struct ContextObject {
  PyObject_HEAD
  PyObject* var;         // the ContextVar set while open
  PyObject* var_token;
  PyObject* open_token;
  PyObject* frame;       // the frame that entered the block (frame injection)
  bool entered;
  bool paused_gc;
};

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

void patch(bool on) {
  if (g_state.patches == nullptr) return;
  if (on ? g_state.patch_depth++ != 0 : --g_state.patch_depth != 0) return;
  const Py_ssize_t n = PyList_GET_SIZE(g_state.patches);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = PyList_GET_ITEM(g_state.patches, i);
    // Plain dicts of str keys: no Python code runs in the update.
    if (PyDict_Update(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, on ? 1 : 2)) != 0) PyErr_Clear();
  }
}

void pause_gc() {
  if (g_state.gc_depth++ == 0) g_state.gc_was_enabled = PyGC_Disable() != 0;
}

void resume_gc() {
  if (--g_state.gc_depth == 0 && g_state.gc_was_enabled) PyGC_Enable();
}

// Restores the context variables and the factories; keeps any pending exception.
void undo(ContextObject* self) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (self->open_token != nullptr) {
    if (PyContextVar_Reset(g_state.open_var, self->open_token) != 0) {
      // Left in another context than it was entered in: drop this block from the stack there.
      PyErr_Clear();
      PyObject* open = nullptr;
      if (PyContextVar_Get(g_state.open_var, nullptr, &open) == 0 && open != nullptr && PyTuple_Check(open)) {
        PyObject* rest = PyList_New(0);
        for (Py_ssize_t i = 0; rest != nullptr && i < PyTuple_GET_SIZE(open); ++i) {
          PyObject* item = PyTuple_GET_ITEM(open, i);
          if (item != reinterpret_cast<PyObject*>(self) && PyList_Append(rest, item) != 0) Py_CLEAR(rest);
        }
        PyObject* tuple = rest != nullptr ? PyList_AsTuple(rest) : nullptr;
        PyObject* token = tuple != nullptr ? PyContextVar_Set(g_state.open_var, tuple) : nullptr;
        Py_XDECREF(token);
        Py_XDECREF(tuple);
        Py_XDECREF(rest);
      }
      Py_XDECREF(open);
      PyErr_Clear();
    }
    Py_CLEAR(self->open_token);
  }
  if (self->var_token != nullptr) {
    if (PyContextVar_Reset(self->var, self->var_token) != 0) {
      PyErr_Clear();
      PyObject* token = PyContextVar_Set(self->var, Py_None);
      Py_XDECREF(token);
      PyErr_Clear();
    }
    Py_CLEAR(self->var_token);
  }
  if (self->entered) patch(false);
  self->entered = false;
  PyErr_Restore(type, value, tb);
}

PyObject* context_enter(PyObject* obj, PyObject* /*unused*/) {
  static PyObject* const s_var = intern("_var");
  static PyObject* const s_pauses_gc = intern("_pauses_gc");
  static PyObject* const s_refuse = intern("_refuse");
  static PyObject* const s_enter = intern("_enter");
  auto* self = reinterpret_cast<ContextObject*>(obj);
  if (self->entered || g_state.open_var == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, self->entered ? "this block is open already: a trace, edit or session is entered once"
                                                      : "fastinterleave: the context state is not set up");
    return nullptr;
  }
  PyObject* var = PyObject_GetAttr(obj, s_var);
  if (var == nullptr) return nullptr;
  PyObject* open_here = nullptr;
  if (PyContextVar_Get(var, Py_None, &open_here) != 0) {
    Py_DECREF(var);
    return nullptr;
  }
  if (open_here != Py_None) {
    Py_DECREF(var);
    PyObject* r = PyObject_CallMethodOneArg(obj, s_refuse, open_here);
    Py_DECREF(open_here);
    Py_XDECREF(r);
    if (r != nullptr) PyErr_SetString(PyExc_RuntimeError, "fastinterleave: _refuse returned instead of raising");
    return nullptr;
  }
  Py_DECREF(open_here);
  PyObject* pauses = PyObject_GetAttr(obj, s_pauses_gc);
  const int pause = pauses == nullptr ? -1 : PyObject_IsTrue(pauses);
  Py_XDECREF(pauses);
  if (pause < 0) {
    Py_DECREF(var);
    return nullptr;
  }
  PyObject* open = nullptr;
  if (PyContextVar_Get(g_state.open_var, nullptr, &open) != 0) {
    Py_DECREF(var);
    return nullptr;
  }
  const Py_ssize_t n = open != nullptr && PyTuple_Check(open) ? PyTuple_GET_SIZE(open) : 0;
  PyObject* stack = PyTuple_New(n + 1);
  if (stack == nullptr) {
    Py_XDECREF(open);
    Py_DECREF(var);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) PyTuple_SET_ITEM(stack, i, Py_NewRef(PyTuple_GET_ITEM(open, i)));
  PyTuple_SET_ITEM(stack, n, Py_NewRef(obj));
  Py_XDECREF(open);

  // From here to _enter(): C only, so no signal handler runs in between.
  Py_XSETREF(self->var, var);
  self->var_token = PyContextVar_Set(var, obj);
  self->open_token = self->var_token != nullptr ? PyContextVar_Set(g_state.open_var, stack) : nullptr;
  Py_DECREF(stack);
  if (self->open_token == nullptr) {
    undo(self);
    return nullptr;
  }
  self->entered = true;
  patch(true);
  self->paused_gc = pause != 0;
  if (self->paused_gc) pause_gc();
  Py_XSETREF(self->frame, Py_XNewRef(reinterpret_cast<PyObject*>(PyEval_GetFrame())));

  PyObject* result = PyObject_CallMethodNoArgs(obj, s_enter);
  if (result == nullptr) {
    undo(self);
    if (self->paused_gc) resume_gc();
    self->paused_gc = false;
    Py_CLEAR(self->frame);
  }
  return result;
}

PyObject* context_exit(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  static PyObject* const s_exit = intern("_exit");
  auto* self = reinterpret_cast<ContextObject*>(obj);
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "__exit__ takes (exc_type, exc, tb)");
    return nullptr;
  }
  undo(self);
  PyObject* result = PyObject_VectorcallMethod(s_exit, std::array<PyObject*, 4>{obj, args[0], args[1], args[2]}.data(),
                                               4, nullptr);
  if (self->paused_gc) resume_gc();
  self->paused_gc = false;
  Py_CLEAR(self->frame);
  return result;
}

PyObject* context_new(PyTypeObject* type, PyObject* /*args*/, PyObject* /*kwargs*/) {
  // object.__new__, not tp_alloc alone: it sets up a Python subclass's inline
  // attribute values (without them every attribute of a trace is a dict lookup).
  // Subclasses take their own arguments in __init__.
  static PyObject* const no_args = PyTuple_New(0);
  return PyBaseObject_Type.tp_new(type, no_args, nullptr);
}

int context_traverse(PyObject* obj, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<ContextObject*>(obj);
  Py_VISIT(self->var);
  Py_VISIT(self->var_token);
  Py_VISIT(self->open_token);
  Py_VISIT(self->frame);
  return 0;
}

int context_clear(PyObject* obj) {
  auto* self = reinterpret_cast<ContextObject*>(obj);
  Py_CLEAR(self->var);
  Py_CLEAR(self->var_token);
  Py_CLEAR(self->open_token);
  Py_CLEAR(self->frame);
  return 0;
}

void context_dealloc(PyObject* obj) {
  PyObject_GC_UnTrack(obj);
  context_clear(obj);
  Py_TYPE(obj)->tp_free(obj);
}

PyObject* context_state(PyObject* /*self*/, PyObject* /*unused*/) {
  return Py_BuildValue("{s:i,s:i}", "patch_depth", g_state.patch_depth, "gc_depth", g_state.gc_depth);
}

PyObject* set_context_state(PyObject* /*self*/, PyObject* args) {
  PyObject *open_var, *patches;
  if (!PyArg_ParseTuple(args, "OO!:set_context_state", &open_var, &PyList_Type, &patches)) return nullptr;
  if (!PyContextVar_CheckExact(open_var)) {
    PyErr_SetString(PyExc_TypeError, "set_context_state: a ContextVar");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(patches); ++i) {
    PyObject* e = PyList_GET_ITEM(patches, i);
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 || !PyDict_Check(PyTuple_GET_ITEM(e, 0)) ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(e, 1)) || !PyDict_CheckExact(PyTuple_GET_ITEM(e, 2))) {
      PyErr_SetString(PyExc_TypeError, "set_context_state: patches are (namespace, recording, original) dicts");
      return nullptr;
    }
  }
  if (g_state.patch_depth != 0) {
    PyErr_SetString(PyExc_RuntimeError, "set_context_state: blocks are open");
    return nullptr;
  }
  Py_XSETREF(g_state.open_var, Py_NewRef(open_var));
  Py_XSETREF(g_state.patches, Py_NewRef(patches));
  Py_RETURN_NONE;
}

PyMethodDef g_context_methods[] = {
    {"__enter__", context_enter, METH_NOARGS, "Opens the block (see fastinterleave's Tracer / Session)."},
    {"__exit__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&context_exit)), METH_FASTCALL,
     "Closes the block: its state first, then its Python part."},
    {nullptr, nullptr, 0, nullptr}};

PyMemberDef g_context_members[] = {
    {"_frame", T_OBJECT, offsetof(ContextObject, frame), 0, "The frame that entered the block, while it is open."},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject g_context_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyMethodDef g_module_functions[] = {
    {"set_context_state", set_context_state, METH_VARARGS,
     "set_context_state(open_var, [(namespace, recording, original), ...]): the stack of open blocks "
     "and the factory patches every block installs while open."},
    {"context_state", context_state, METH_NOARGS, "Patch and collector-pause depths (for tests)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void register_context(py::module_& m) {
  PyTypeObject& t = g_context_type;
  t.tp_name = "fastinterleave._C.Context";
  t.tp_basicsize = sizeof(ContextObject);
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC;
  t.tp_doc = "The base of trace, edit and session blocks: entered and left in C.";
  t.tp_new = context_new;
  t.tp_traverse = context_traverse;
  t.tp_clear = context_clear;
  t.tp_dealloc = context_dealloc;
  t.tp_methods = g_context_methods;
  t.tp_members = g_context_members;
  if (PyType_Ready(&t) < 0) throw py::error_already_set();
  Py_INCREF(&t);
  m.add_object("Context", py::handle(reinterpret_cast<PyObject*>(&t)));
  for (PyMethodDef* def = g_module_functions; def->ml_name != nullptr; ++def) {
    m.add_object(def->ml_name, py::reinterpret_steal<py::object>(PyCFunction_NewEx(def, nullptr, nullptr)));
  }
}

}  // namespace fastinterleave::python
