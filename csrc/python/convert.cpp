#include "convert.h"

#include <fastinterleave/ops.h>

#include <structmember.h>

#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Size.h>
#include <torch/csrc/autograd/python_variable.h>

namespace fastinterleave::python {

using c10::IValue;

PyObjectHolder::~PyObjectHolder() {
  if (!Py_IsInitialized()) {
    obj.release();  // interpreter gone: leak rather than touch it
    return;
  }
  py::gil_scoped_acquire gil;
  obj = py::object();
}

namespace {

PyObject* g_proxy_type = nullptr;
// Where a Proxy keeps its `_graph` and `_node` slots (their member descriptors'
// offsets): read directly, without an attribute lookup per argument.
Py_ssize_t g_graph_offset = -1, g_node_offset = -1;

Py_ssize_t slot_offset(py::handle type, const char* name) {
  auto d = py::reinterpret_steal<py::object>(PyObject_GetAttrString(type.ptr(), name));  // inherited too
  if (!d) {
    PyErr_Clear();
    return -1;
  }
  if (Py_TYPE(d.ptr()) != &PyMemberDescr_Type) return -1;
  const PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d.ptr())->d_member;
  return m->type == T_OBJECT_EX ? m->offset : -1;
}

PyObject* slot(PyObject* obj, Py_ssize_t offset) {
  return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + offset);
}

IValue opaque(py::handle obj) {
  return IValue::make_capsule(c10::make_intrusive<PyObjectHolder>(py::reinterpret_borrow<py::object>(obj)));
}

bool all_str_keys(py::handle dict) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(dict.ptr(), &pos, &key, &value)) {
    if (!PyUnicode_Check(key)) return false;
  }
  return true;
}

// A @dataclass instance (not a class) whose fields all go to __init__: its
// fields by name, so it can be rebuilt as cls(**fields); else None.
std::optional<c10::impl::GenericDict> dataclass_fields(py::handle obj) {
  static PyObject* const s_fields = PyUnicode_InternFromString("__dataclass_fields__");
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()));
  if (PyType_Check(obj.ptr())) return std::nullopt;
  auto fields = py::reinterpret_steal<py::object>(PyObject_GetAttr(type, s_fields));
  if (!fields) {
    PyErr_Clear();
    return std::nullopt;
  }
  if (!PyDict_Check(fields.ptr())) return std::nullopt;
  static PyObject* const field_kind = py::object(py::module_::import("dataclasses").attr("_FIELD")).release().ptr();
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  PyObject *key, *field;
  Py_ssize_t pos = 0;
  while (PyDict_Next(fields.ptr(), &pos, &key, &field)) {
    py::handle f(field);
    if (py::object(f.attr("_field_type")).ptr() != field_kind) continue;  // ClassVar / InitVar pseudo-fields
    if (!py::cast<bool>(f.attr("init"))) return std::nullopt;
    d.insert(py::cast<std::string>(key), to_ivalue(obj.attr(key)));
  }
  return d;
}

c10::impl::GenericDict to_dict(py::handle obj) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(obj.ptr(), &pos, &key, &value)) {
    d.insert(py::cast<std::string>(key), to_ivalue(value));
  }
  return d;
}

}  // namespace

IValue to_ivalue(py::handle obj) {
  PyObject* p = obj.ptr();
  if (THPVariable_Check(p)) return IValue(THPVariable_Unpack(p));
  if (p == Py_None) return IValue();
  if (PyBool_Check(p)) return IValue(p == Py_True);
  if (PyLong_CheckExact(p) || (PyLong_Check(p) && !PyBool_Check(p))) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(p, &overflow);
    if (overflow) return opaque(obj);
    return IValue(static_cast<int64_t>(v));
  }
  if (PyFloat_Check(p)) return IValue(PyFloat_AS_DOUBLE(p));
  if (PyUnicode_Check(p)) return IValue(py::cast<std::string>(obj));
  if (THPDtype_Check(p)) return make_dtype(reinterpret_cast<THPDtype*>(p)->scalar_type);
  if (THPDevice_Check(p)) return IValue(reinterpret_cast<THPDevice*>(p)->device);
  if (PyTuple_Check(p)) {
    const Py_ssize_t n = PyTuple_GET_SIZE(p);
    std::vector<IValue> items;
    items.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) items.push_back(to_ivalue(PyTuple_GET_ITEM(p, i)));
    return IValue(c10::ivalue::Tuple::create(std::move(items)));
  }
  if (PyList_CheckExact(p)) {
    Arg list = Arg::make_seq(Arg::Kind::List, {});
    const Py_ssize_t n = PyList_GET_SIZE(p);
    for (Py_ssize_t i = 0; i < n; ++i) list.items.push_back(Arg::make_const(to_ivalue(PyList_GET_ITEM(p, i))));
    return *fastinterleave::to_ivalue(list);
  }
  if (PyDict_Check(p) && all_str_keys(obj)) {
    if (PyDict_CheckExact(p)) return IValue(to_dict(obj));
    // dict subclasses (OrderedDict, transformers' ModelOutput): keep the class.
    auto cls = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(p)));
    return make_record(to_dict(obj), c10::make_intrusive<PyObjectHolder>(std::move(cls)));
  }
  // torch.Size: a list of ints inside, a torch.Size again in Python (to_python).
  if (THPSize_Check(p)) return IValue(c10::List<int64_t>(py::cast<std::vector<int64_t>>(obj)));
  // @dataclass outputs are records like ModelOutputs: sliced per invoke, rebuilt after.
  if (auto fields = dataclass_fields(obj)) {
    auto cls = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(p)));
    return make_record(std::move(*fields), c10::make_intrusive<PyObjectHolder>(std::move(cls)));
  }
  return opaque(obj);
}

IValue result_to_ivalue(py::handle obj) {
  // A list/dict/set made by Python code (nnsight.list(), fn results) stays the
  // same object, so later calls (append, update) change it, not a copy.
  if (PyList_CheckExact(obj.ptr()) || PyDict_CheckExact(obj.ptr()) || PyAnySet_Check(obj.ptr())) return opaque(obj);
  return to_ivalue(obj);
}

py::object to_python(const IValue& v, py::handle like) {
  if (v.isTensor()) return py::reinterpret_steal<py::object>(THPVariable_Wrap(v.toTensor()));
  if (v.isNone()) return py::none();
  if (v.isBool()) return py::bool_(v.toBool());
  if (v.isInt()) return py::int_(v.toInt());
  if (v.isDouble()) return py::float_(v.toDouble());
  if (v.isString()) return py::str(v.toStringRef());
  if (v.isDevice()) return py::reinterpret_steal<py::object>(THPDevice_New(v.toDevice()));
  if (v.isTuple()) {
    const auto& items = v.toTupleRef().elements();
    const bool same_shape = like && PyTuple_Check(like.ptr()) &&
                            static_cast<size_t>(PyTuple_GET_SIZE(like.ptr())) == items.size();
    py::tuple out(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      out[i] = to_python(items[i], same_shape ? py::handle(PyTuple_GET_ITEM(like.ptr(), static_cast<Py_ssize_t>(i))) : py::handle());
    }
    if (same_shape && !PyTuple_CheckExact(like.ptr())) {
      py::handle cls = reinterpret_cast<PyObject*>(Py_TYPE(like.ptr()));
      if (py::hasattr(cls, "_make")) return cls.attr("_make")(out);  // namedtuple
      return cls(out);                                                  // torch.Size and friends
    }
    return std::move(out);
  }
  if (v.isIntList() && !(like && PyList_Check(like.ptr()))) {
    // Sizes (`p.shape`, `p.size()`) are int lists in the engine and torch.Size in Python.
    py::tuple sizes(v.toListRef().size());
    size_t i = 0;
    for (const auto& x : v.toListRef()) sizes[i++] = py::int_(x.toInt());
    return py::reinterpret_steal<py::object>(
        PyObject_CallOneArg(reinterpret_cast<PyObject*>(&THPSizeType), sizes.ptr()));
  }
  if (v.isList()) {
    py::list out;
    for (const auto& x : v.toListRef()) out.append(to_python(x));
    return std::move(out);
  }
  if (v.isGenericDict()) {
    py::dict out;
    for (const auto& kv : v.toGenericDict()) out[to_python(kv.key())] = to_python(kv.value());
    return std::move(out);
  }
  if (auto d = as_dtype(v)) return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(*d)));
  if (const Record* r = as_record(v)) {
    py::dict fields;
    for (const auto& kv : r->fields) {
      py::handle sub = like && PyDict_Check(like.ptr()) ? PyDict_GetItemString(like.ptr(), kv.key().toStringRef().c_str()) : nullptr;
      fields[py::str(kv.key().toStringRef())] = to_python(kv.value(), sub);
    }
    if (auto* cls = dynamic_cast<PyObjectHolder*>(r->type.get())) return cls->obj(**fields);
    if (auto* ret = dynamic_cast<ReturnTypeTag*>(r->type.get())) {
      py::tuple values(py::len(fields));
      size_t i = 0;
      for (auto kv : fields) values[i++] = kv.second;
      py::module_ types = py::module_::import("torch.return_types");
      if (py::hasattr(types, ret->op.c_str())) return types.attr(ret->op.c_str())(values);
      return std::move(values);
    }
    return std::move(fields);
  }
  if (v.isCapsule()) {
    if (auto* h = dynamic_cast<PyObjectHolder*>(v.toCapsule().get())) return h->obj;
  }
  throw std::invalid_argument(std::string("fastinterleave: cannot convert a ") + v.tagKind() + " to Python");
}

void set_proxy_type(py::handle type) {
  Py_XINCREF(type.ptr());
  Py_XDECREF(g_proxy_type);
  g_proxy_type = type.ptr();
  g_graph_offset = type ? slot_offset(type, "_graph") : -1;
  g_node_offset = type ? slot_offset(type, "_node") : -1;
}

void add_fast_function(py::module_& m, PyMethodDef* def) {
  m.add_object(def->ml_name, py::reinterpret_steal<py::object>(PyCFunction_NewEx(def, nullptr, nullptr)));
}

PyObject* node_of_proxy(PyObject* obj, PyObject* graph) {
  if (g_proxy_type == nullptr || !PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(g_proxy_type))) return nullptr;
  if (g_graph_offset >= 0 && g_node_offset >= 0) {
    return slot(obj, g_graph_offset) == graph ? slot(obj, g_node_offset) : nullptr;
  }
  static PyObject* const s_graph = PyUnicode_InternFromString("_graph");
  static PyObject* const s_node = PyUnicode_InternFromString("_node");
  auto owner = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, s_graph));
  if (!owner) throw py::error_already_set();
  if (owner.ptr() != graph) return nullptr;
  auto node = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, s_node));
  if (!node) throw py::error_already_set();
  return node.ptr();  // the proxy holds it
}

Arg to_arg(py::handle obj, py::handle graph) {
  // Interned once: attribute lookups by C string would build a str each time.
  static PyObject* const s_value = PyUnicode_InternFromString("value");
  PyObject* p = obj.ptr();
  if (g_proxy_type && PyObject_TypeCheck(p, reinterpret_cast<PyTypeObject*>(g_proxy_type))) {
    if (PyObject* node = node_of_proxy(p, graph.ptr())) return Arg::make_ref(py::handle(node).cast<int32_t>());
    auto value = py::reinterpret_steal<py::object>(PyObject_GetAttr(p, s_value));
    if (!value) throw py::error_already_set();
    return Arg::make_const(result_to_ivalue(value));  // the same object: appends land
  }
  if (PySlice_Check(p)) {
    auto* s = reinterpret_cast<PySliceObject*>(p);
    Arg a;
    a.kind = Arg::Kind::Slice;
    a.items.reserve(3);
    a.items.push_back(to_arg(s->start, graph));
    a.items.push_back(to_arg(s->stop, graph));
    a.items.push_back(to_arg(s->step, graph));
    return a;
  }
  if (p == Py_Ellipsis) {
    Arg a;
    a.kind = Arg::Kind::Ellipsis;
    return a;
  }
  if (PyTuple_CheckExact(p) || PyList_CheckExact(p)) {
    Arg a;
    const bool tuple = PyTuple_CheckExact(p);
    a.kind = tuple ? Arg::Kind::Tuple : Arg::Kind::List;
    const Py_ssize_t n = Py_SIZE(p);
    a.items.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) a.items.push_back(to_arg(tuple ? PyTuple_GET_ITEM(p, i) : PyList_GET_ITEM(p, i), graph));
    return a;
  }
  if (PyDict_CheckExact(p) && all_str_keys(obj)) {
    Arg a;
    a.kind = Arg::Kind::Dict;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(p, &pos, &key, &value)) {
      a.keys.push_back(py::cast<std::string>(key));
      a.items.push_back(to_arg(value, graph));
    }
    return a;
  }
  return Arg::make_const(to_ivalue(obj));
}

py::object arg_to_python(const Arg& a) {
  switch (a.kind) {
    case Arg::Kind::Const:
      return to_python(a.value);
    case Arg::Kind::Ellipsis:
      return py::reinterpret_borrow<py::object>(Py_Ellipsis);
    case Arg::Kind::Slice:
      return py::reinterpret_steal<py::object>(PySlice_New(arg_to_python(a.items[0]).ptr(),
                                                           arg_to_python(a.items[1]).ptr(),
                                                           arg_to_python(a.items[2]).ptr()));
    case Arg::Kind::Tuple:
    case Arg::Kind::List: {
      py::list out;
      for (const auto& x : a.items) out.append(arg_to_python(x));
      if (a.kind == Arg::Kind::Tuple) return py::tuple(out);
      return std::move(out);
    }
    case Arg::Kind::Dict: {
      py::dict out;
      for (size_t i = 0; i < a.items.size(); ++i) out[py::str(a.keys[i])] = arg_to_python(a.items[i]);
      return std::move(out);
    }
    case Arg::Kind::Ref:
      break;
  }
  throw std::logic_error("fastinterleave: unresolved reference passed to Python");
}

}  // namespace fastinterleave::python
