// The storage of a recorded value's proxy: (graph, node). Every recorded
// operation makes one, so it is made in C (a Python __init__ is a frame per
// proxy); fastinterleave.proxy.Proxy adds the behaviour.
#include <pybind11/pybind11.h>

#include <structmember.h>

namespace fastinterleave::python {

namespace {

struct ProxyObject {
  PyObject_HEAD
  PyObject* graph;
  PyObject* node;
  PyObject* weakrefs;
};

PyObject* proxy_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 2 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "Proxy(graph, node) takes two positional arguments");
    return nullptr;
  }
  auto* self = reinterpret_cast<ProxyObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->graph = Py_NewRef(PyTuple_GET_ITEM(args, 0));
  self->node = Py_NewRef(PyTuple_GET_ITEM(args, 1));
  return reinterpret_cast<PyObject*>(self);
}

// Proxies sit in their graph's node records, which the graph holds: cycles the
// collector must see.
int proxy_traverse(PyObject* obj, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<ProxyObject*>(obj);
  Py_VISIT(self->graph);
  Py_VISIT(self->node);
  return 0;
}

int proxy_clear(PyObject* obj) {
  auto* self = reinterpret_cast<ProxyObject*>(obj);
  Py_CLEAR(self->graph);
  Py_CLEAR(self->node);
  return 0;
}

// (A Python subclass's dealloc and traverse see to the subclass type's reference.)
void proxy_dealloc(PyObject* obj) {
  PyObject_GC_UnTrack(obj);
  if (reinterpret_cast<ProxyObject*>(obj)->weakrefs != nullptr) PyObject_ClearWeakRefs(obj);
  proxy_clear(obj);
  Py_TYPE(obj)->tp_free(obj);
}

PyMemberDef g_proxy_members[] = {
    {"_graph", T_OBJECT_EX, offsetof(ProxyObject, graph), READONLY, "The graph that recorded this value."},
    {"_node", T_OBJECT_EX, offsetof(ProxyObject, node), READONLY, "The node of this value in the graph."},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject g_proxy_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

}  // namespace

void register_proxy(pybind11::module_& m) {
  PyTypeObject& t = g_proxy_type;
  t.tp_name = "fastinterleave._C.ProxyBase";
  t.tp_basicsize = sizeof(ProxyObject);
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC;
  t.tp_doc = "ProxyBase(graph, node): where a proxy's value comes from (the behaviour is fastinterleave.Proxy's).";
  t.tp_new = proxy_new;
  t.tp_dealloc = proxy_dealloc;
  t.tp_traverse = proxy_traverse;
  t.tp_clear = proxy_clear;
  t.tp_members = g_proxy_members;
  t.tp_weaklistoffset = offsetof(ProxyObject, weakrefs);
  if (PyType_Ready(&t) < 0) throw pybind11::error_already_set();
  m.add_object("ProxyBase", pybind11::handle(reinterpret_cast<PyObject*>(&t)));
}

}  // namespace fastinterleave::python
