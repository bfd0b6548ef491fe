// Bindings for the engine: graph in, plan out; runs with their module hooks;
// exceptions; graph files. Conversions only: the engine decides what runs.
#include "convert.h"

#include <fastinterleave/compiler.h>
#include <fastinterleave/scheduler.h>
#include <fastinterleave/serialize.h>

#include <pybind11/stl.h>

namespace fastinterleave::python {

namespace {

PyObject* g_intervention_error = nullptr;
PyObject* g_early_stop = nullptr;

// Node tuples from the Python front:
// (op, name, args, kwargs, site, iteration, invoker, projection, py_fn, line)
std::shared_ptr<Graph> build_graph(py::list nodes, py::list sites, py::list invokers, int64_t batch_size,
                                   py::list saved, py::list lines, py::handle token) {
  auto g = std::make_shared<Graph>();
  g->batch_size = batch_size;
  for (py::handle s : sites) {
    auto t = s.cast<py::tuple>();
    g->sites.push_back(SiteKey{t[0].cast<std::string>(), static_cast<HookKind>(t[1].cast<int>())});
  }
  for (py::handle inv : invokers) {
    auto t = inv.cast<py::tuple>();
    g->invokers.push_back(InvokerSlice{t[0].cast<int64_t>(), t[1].cast<int64_t>()});
  }
  for (py::handle l : lines) g->lines.push_back(l.cast<std::string>());
  g->nodes.reserve(py::len(nodes));
  auto as_int = [](PyObject* v) {
    const long r = PyLong_AsLong(v);
    if (r == -1 && PyErr_Occurred()) throw py::error_already_set();
    return r;
  };
  for (py::handle item : nodes) {
    PyObject* t = item.ptr();
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 10) throw std::invalid_argument("fastinterleave: bad node record");
    Node n;
    const long op = as_int(PyTuple_GET_ITEM(t, 0));
    if (op < 0 || op >= static_cast<long>(Op::kCount)) throw std::invalid_argument("fastinterleave: bad op code");
    n.op = static_cast<Op>(op);
    Py_ssize_t name_size = 0;
    const char* name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(t, 1), &name_size);
    if (name == nullptr) throw py::error_already_set();
    n.name.assign(name, static_cast<size_t>(name_size));
    PyObject* args = PyTuple_GET_ITEM(t, 2);
    if (PyTuple_CheckExact(args)) {
      const Py_ssize_t count = PyTuple_GET_SIZE(args);
      n.args.reserve(static_cast<size_t>(count));
      for (Py_ssize_t i = 0; i < count; ++i) n.args.push_back(to_arg(PyTuple_GET_ITEM(args, i), token));
    } else {
      for (py::handle a : py::handle(args)) n.args.push_back(to_arg(a, token));
    }
    py::handle kw = PyTuple_GET_ITEM(t, 3);
    if (!kw.is_none()) {
      for (auto kv : kw.cast<py::dict>()) n.kwargs.emplace_back(kv.first.cast<std::string>(), to_arg(kv.second, token));
    }
    n.site = static_cast<int32_t>(as_int(PyTuple_GET_ITEM(t, 4)));
    // Which calls: an int, (start, stop or None) for a range / .all(), or a list.
    py::handle it = PyTuple_GET_ITEM(t, 5);
    if (PyLong_Check(it.ptr())) {
      n.iteration = static_cast<int32_t>(as_int(it.ptr()));
    } else if (PyTuple_Check(it.ptr())) {
      auto range = it.cast<py::tuple>();
      n.iteration = range[0].cast<int32_t>();
      n.iter_stop = range[1].is_none() ? kUnbounded : range[1].cast<int32_t>();
    } else {
      n.iter_list = it.cast<std::vector<int32_t>>();
      if (!n.iter_list.empty()) n.iteration = n.iter_list.front();
    }
    n.invoker = static_cast<int32_t>(as_int(PyTuple_GET_ITEM(t, 6)));
    n.projection = static_cast<Projection>(as_int(PyTuple_GET_ITEM(t, 7)));
    n.py_fn = static_cast<int32_t>(as_int(PyTuple_GET_ITEM(t, 8)));
    n.line = static_cast<int32_t>(as_int(PyTuple_GET_ITEM(t, 9)));
    g->nodes.push_back(std::move(n));
  }
  for (py::handle s : saved) {
    auto i = s.cast<int64_t>();
    if (i < 0 || static_cast<size_t>(i) >= g->nodes.size()) throw std::invalid_argument("fastinterleave: bad saved index");
    g->nodes[static_cast<size_t>(i)].saved = true;
  }
  return g;
}

struct PyPlan {
  std::shared_ptr<const Plan> plan;
};

// One run of a plan, with the Python callables its fallback nodes need.
class PyRun {
 public:
  PyRun(const PyPlan& plan, py::list fns, bool allow_fallback)
      : fns_(std::move(fns)),
        run_(plan.plan, Run::Options{[this](const Node& n, const ResolvedArgs& a, const ResolvedKwargs& k) {
                                       return fallback(n, a, k);
                                     },
                                     allow_fallback}) {}
  PyRun(const PyRun&) = delete;
  PyRun& operator=(const PyRun&) = delete;
  ~PyRun();  // detaches its hooks, should anything have left them attached

  Run& run() { return run_; }

  std::vector<py::object> attached;  // the SiteHooks serving this run (they point at it)
  // The thread that runs the trace: its hooks serve calls from it only, and pass
  // every other thread's calls of the same modules through untouched.
  const unsigned long owner = PyThread_get_thread_ident();

  py::object value(int32_t node) {
    c10::IValue v = run_.value(node);
    return to_python(v);
  }

 private:
  c10::IValue fallback(const Node& n, const ResolvedArgs& args, const ResolvedKwargs& kwargs) {
    // Backward hooks run while backward() has released the GIL (and, on CUDA,
    // on autograd's own threads).
    py::gil_scoped_acquire gil;
    switch (n.op) {
      case Op::GetItem:
        return result_to_ivalue(arg_to_python(args[0])[arg_to_python(args[1])]);
      case Op::SetItem: {
        py::object target = arg_to_python(args[0]);
        if (PyObject_SetItem(target.ptr(), arg_to_python(args[1]).ptr(), arg_to_python(args[2]).ptr()) != 0) {
          throw py::error_already_set();
        }
        return c10::IValue();
      }
      case Op::GetAttr:
        return result_to_ivalue(arg_to_python(args[0]).attr(py::str(n.name)));
      default: {
        py::tuple pargs(args.size());
        for (size_t i = 0; i < args.size(); ++i) pargs[i] = arg_to_python(args[i]);
        py::dict pkw;
        for (const auto& [k, v] : kwargs) pkw[py::str(k)] = arg_to_python(v);
        py::object fn = fns_[static_cast<size_t>(n.py_fn)];
        return result_to_ivalue(fn(*pargs, **pkw));
      }
    }
  }

  py::list fns_;
  Run run_;
};

// The engine runs without the GIL (a backward pass it starts must not hold it);
// the fallback takes it back for Python code.
bool fire_without_gil(Run& r, int32_t site, c10::IValue& v) {
  py::gil_scoped_release nogil;
  return r.fire(site, v);
}

// A module hook of the engine. It stays installed on its module between
// traces (so a trace registers no hooks when its sites have not changed) and
// returns at once, changing nothing, while no run is attached to it.
// Output hooks take (module, args, output) and return the swapped output or
// None; input pre-hooks (with kwargs) take (module, args, kwargs) and return
// (args, kwargs) when swapped.
//
// A raw CPython type, called by vectorcall: torch calls it on every forward of
// its module, idle or not, and pybind11's dispatcher would cost more than an
// idle call does. Copies and pickles of a module carry a new idle hook.
struct SiteHookObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyRun* run;  // null while idle; the run detaches its hooks before it ends
  int32_t site;
  bool output;
};

PyTypeObject g_site_hook_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

SiteHookObject* as_site_hook(py::handle h) {
  if (Py_TYPE(h.ptr()) != &g_site_hook_type) throw py::type_error("fastinterleave: not a SiteHook");
  return reinterpret_cast<SiteHookObject*>(h.ptr());
}

py::object fire_site_hook(SiteHookObject* hook, PyObject* a, PyObject* b) {
  Run& r = hook->run->run();
  if (r.paused()) return py::none();
  if (!r.pending(hook->site)) {
    r.skip_call(hook->site);
    return py::none();
  }
  if (hook->output) {
    c10::IValue v = to_ivalue(b);
    if (!fire_without_gil(r, hook->site, v)) return py::none();
    return to_python(v, b);
  }
  py::tuple pair = py::make_tuple(py::handle(a), py::handle(b));
  c10::IValue v = to_ivalue(pair);
  if (!fire_without_gil(r, hook->site, v)) return py::none();
  return to_python(v, pair);
}

PyObject* site_hook_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  if (PyVectorcall_NARGS(nargsf) != 3 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError, "SiteHook takes (module, args, output) or (module, args, kwargs)");
    return nullptr;
  }
  auto* hook = reinterpret_cast<SiteHookObject*>(self);
  if (hook->run == nullptr || hook->run->owner != PyThread_get_thread_ident()) Py_RETURN_NONE;
  try {
    return fire_site_hook(hook, args[1], args[2]).release().ptr();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* site_hook_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"output", nullptr};
  int output = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "p:SiteHook", const_cast<char**>(names), &output)) return nullptr;
  auto* hook = reinterpret_cast<SiteHookObject*>(type->tp_alloc(type, 0));
  if (hook == nullptr) return nullptr;
  hook->vectorcall = site_hook_call;
  hook->run = nullptr;
  hook->site = -1;
  hook->output = output != 0;
  return reinterpret_cast<PyObject*>(hook);
}

// copy, deepcopy and pickle: an idle hook of the same kind (the copy's module
// is no model's to run).
PyObject* site_hook_reduce(PyObject* self, PyObject* /*unused*/) {
  return Py_BuildValue("(O(O))", reinterpret_cast<PyObject*>(Py_TYPE(self)),
                       reinterpret_cast<SiteHookObject*>(self)->output ? Py_True : Py_False);
}

PyObject* site_hook_attached(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<SiteHookObject*>(self)->run != nullptr);
}

PyMethodDef g_site_hook_methods[] = {
    {"__reduce__", site_hook_reduce, METH_NOARGS, "An idle hook of the same kind."},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef g_site_hook_getset[] = {
    {"attached", site_hook_attached, nullptr, "Whether a run is attached (the hook is not idle).", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

void register_site_hook(py::module_& m) {
  PyTypeObject& t = g_site_hook_type;
  t.tp_name = "fastinterleave._C.SiteHook";
  t.tp_basicsize = sizeof(SiteHookObject);
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  t.tp_doc = "SiteHook(output): a module hook of the engine (idle until a run attaches to it).";
  t.tp_new = site_hook_new;
  t.tp_call = PyVectorcall_Call;
  t.tp_vectorcall_offset = offsetof(SiteHookObject, vectorcall);
  t.tp_methods = g_site_hook_methods;
  t.tp_getset = g_site_hook_getset;
  if (PyType_Ready(&t) < 0) throw py::error_already_set();
  Py_INCREF(&t);
  m.add_object("SiteHook", py::handle(reinterpret_cast<PyObject*>(&t)));
}

// Attaches `hooks` (one per plan site, in site order) to a run; detach() makes
// them idle again. The run keeps them alive while attached.
void attach(const std::shared_ptr<PyRun>& run, py::list hooks) {
  if (!run->attached.empty()) throw std::logic_error("fastinterleave: this run already has hooks");
  for (py::handle h : hooks) {
    if (as_site_hook(h)->run != nullptr) {
      throw std::logic_error("fastinterleave: a hook is attached to another run (the same model running twice at once)");
    }
  }
  int32_t site = 0;
  for (py::handle h : hooks) {
    SiteHookObject* hook = as_site_hook(h);
    hook->run = run.get();
    hook->site = site++;
    run->attached.push_back(py::reinterpret_borrow<py::object>(h));
  }
}

// Attaches `hooks` (one per site of the recorded graph, in its order) to a run:
// each plan site gets the hook of its graph site; hooks of sites the plan does
// not use stay idle.
void attach_graph_sites(const std::shared_ptr<PyRun>& run, py::list hooks) {
  const Plan& plan = run->run().plan();
  const auto& nodes = plan.graph->nodes;
  py::list ordered(plan.sites.size());
  for (size_t i = 0; i < nodes.size(); ++i) {
    const int32_t ps = plan.site_of_node[i];
    if (ps < 0) continue;
    const auto g = static_cast<size_t>(nodes[i].site);
    if (g >= static_cast<size_t>(py::len(hooks))) throw std::logic_error("fastinterleave: no hook for a site of the graph");
    ordered[static_cast<size_t>(ps)] = hooks[g];
  }
  attach(run, ordered);
}

void detach(PyRun& run) {
  for (py::handle h : run.attached) as_site_hook(h)->run = nullptr;
  run.attached.clear();
}

PyRun::~PyRun() { detach(*this); }

// A plan handed to Python without a pybind instance (cheaper to make and drop
// once per trace); `plan_of` wraps it as a Plan when asked for.
constexpr const char* kPlanCapsule = "fastinterleave.plan";

py::object plan_capsule(std::shared_ptr<const Plan> plan) {
  auto* held = new std::shared_ptr<const Plan>(std::move(plan));
  PyObject* capsule = PyCapsule_New(held, kPlanCapsule, [](PyObject* c) {
    delete static_cast<std::shared_ptr<const Plan>*>(PyCapsule_GetPointer(c, kPlanCapsule));
  });
  if (capsule == nullptr) {
    delete held;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

PyPlan plan_of(py::handle capsule) {
  auto* held = static_cast<std::shared_ptr<const Plan>*>(PyCapsule_GetPointer(capsule.ptr(), kPlanCapsule));
  if (held == nullptr) throw py::error_already_set();
  return PyPlan{*held};
}

// A whole trace in one call: compiles the recorded graph, attaches a run of it to
// `hooks` (the model's hooks, one per graph site, in order), calls
// forward(*args, **kwargs) and ends the run (a stop() ending the forward early
// included). Returns (plan, output, {node: value} of the `saved` nodes that have
// one). The hooks are idle again and the run's values dropped on return, whatever
// happened; errors propagate as the separate calls would raise them.
py::tuple run_trace(py::list nodes, py::list sites, py::list invokers, int64_t batch_size, py::list saved,
                    py::list lines, py::handle graph, py::list fns, bool allow_fallback, py::list hooks,
                    py::handle forward, py::handle args, py::handle kwargs) {
  PyPlan plan{compile(build_graph(nodes, sites, invokers, batch_size, saved, lines, graph))};
  auto run = std::make_shared<PyRun>(plan, std::move(fns), allow_fallback);
  attach_graph_sites(run, hooks);
  struct Release {
    PyRun& r;
    ~Release() {
      detach(r);
      r.run().release();
    }
  } release{*run};
  bool stopped = false;  // stop() ended the forward pass (before it began, or from a hook)
  try {
    py::gil_scoped_release nogil;
    run->run().begin();
  } catch (const EarlyStop&) {
    stopped = true;
  }
  py::object output = py::none();
  if (!stopped) {
    py::object call_args = PyTuple_Check(args.ptr()) ? py::reinterpret_borrow<py::object>(args)
                                                     : py::reinterpret_steal<py::object>(PySequence_Tuple(args.ptr()));
    if (!call_args) throw py::error_already_set();
    PyObject* out = PyObject_Call(forward.ptr(), call_args.ptr(), kwargs.is_none() ? nullptr : kwargs.ptr());
    if (out == nullptr) {
      py::error_already_set err;
      if (!err.matches(g_early_stop)) throw err;
      stopped = true;
    } else {
      output = py::reinterpret_steal<py::object>(out);
    }
  }
  if (stopped) {
    run->run().end_stopped();
  } else {
    py::gil_scoped_release nogil;
    run->run().end();
  }
  py::dict values;
  for (py::handle h : saved) {  // (a node saved twice has one entry)
    const auto node = h.cast<int32_t>();
    if (run->run().has_value(node) && !values.contains(h)) values[h] = run->value(node);
  }
  return py::make_tuple(plan_capsule(plan.plan), std::move(output), std::move(values));
}

PyObject* python_error_type(const std::exception_ptr& cause, std::string& message) {
  try {
    std::rethrow_exception(cause);
  } catch (const c10::IndexError& e) {
    message = e.what_without_backtrace();
    return PyExc_IndexError;
  } catch (const c10::ValueError& e) {
    message = e.what_without_backtrace();
    return PyExc_ValueError;
  } catch (const c10::TypeError& e) {
    message = e.what_without_backtrace();
    return PyExc_TypeError;
  } catch (const c10::NotImplementedError& e) {
    message = e.what_without_backtrace();
    return PyExc_NotImplementedError;
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
    return PyExc_RuntimeError;
  } catch (const std::invalid_argument& e) {
    message = e.what();
    return PyExc_ValueError;
  } catch (const std::out_of_range& e) {
    message = e.what();
    return PyExc_IndexError;
  } catch (const std::exception& e) {
    message = e.what();
    return PyExc_RuntimeError;
  } catch (...) {
    message = "unknown C++ exception";
    return PyExc_RuntimeError;
  }
}

// Raises `type(message)` with the node ids the front needs to name the lines.
void raise_with_nodes(PyObject* type, const std::string& message, const NodeError& e) {
  py::object exc = py::reinterpret_borrow<py::object>(type)(message);
  exc.attr("_fi_node") = e.node;
  exc.attr("_fi_other") = e.other;
  exc.attr("_fi_kind") = static_cast<int>(e.kind);
  PyErr_SetObject(type, exc.ptr());
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const NodeError& e) {
    if (e.kind == NodeError::Kind::Failed && e.cause) {
      try {
        std::rethrow_exception(e.cause);
      } catch (py::error_already_set& err) {
        // A Python exception from a fallback: re-raise it as it was, tagged.
        py::object value = err.value();
        try {
          value.attr("_fi_node") = e.node;
          value.attr("_fi_other") = e.other;
          value.attr("_fi_kind") = static_cast<int>(e.kind);
        } catch (py::error_already_set&) {
        }
        err.restore();
        return;
      } catch (...) {
        std::string msg;
        PyObject* type = python_error_type(e.cause, msg);
        raise_with_nodes(type, msg, e);
        return;
      }
    }
    raise_with_nodes(g_intervention_error, e.what(), e);
  } catch (const EarlyStop& e) {
    PyErr_SetString(g_early_stop, e.what());
  } catch (const c10::Error&) {
    std::string msg;
    PyObject* type = python_error_type(std::current_exception(), msg);
    PyErr_SetString(type, msg.c_str());
  }
}


// run_trace, called once per trace: positional arguments only, without the
// dispatcher's overload and argument-caster work.
py::object run_trace_call(PyObject* const* a, Py_ssize_t n) {
  if (n != 13) throw py::type_error("run_trace takes 13 positional arguments");
  auto list = [&](int i) {
    if (!PyList_Check(a[i])) throw py::type_error("run_trace: argument " + std::to_string(i) + " must be a list");
    return py::reinterpret_borrow<py::list>(a[i]);
  };
  const long batch_size = PyLong_AsLong(a[3]);
  if (batch_size == -1 && PyErr_Occurred()) throw py::error_already_set();
  const int fallback = PyObject_IsTrue(a[8]);
  if (fallback < 0) throw py::error_already_set();
  return run_trace(list(0), list(1), list(2), batch_size, list(4), list(5), a[6], list(7), fallback != 0, list(9),
                   a[10], a[11], a[12]);
}

PyMethodDef g_run_trace_def = fast_function<run_trace_call>(
    "run_trace",
    "run_trace(nodes, sites, invokers, batch_size, saved, lines, token, fns, allow_fallback, hooks, forward, args, "
    "kwargs) -> (plan, output, values): compiles a recorded graph and runs it with one forward call.");

}  // namespace

void raise_current() {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (...) {
    try {
      translate(std::current_exception());  // NodeError, EarlyStop, c10::Error
    } catch (...) {
      std::string message;
      PyObject* type = python_error_type(std::current_exception(), message);
      PyErr_SetString(type, message.c_str());
    }
  }
}

void register_engine(py::module_& m) {
  g_intervention_error = PyErr_NewExceptionWithDoc(
      "fastinterleave._C.InterventionError",
      "An intervention that cannot run as written (an edit that would change nothing, a module that never ran, ...).",
      PyExc_RuntimeError, nullptr);
  g_early_stop = PyErr_NewExceptionWithDoc("fastinterleave._C.EarlyStop", "Raised through the model by stop().",
                                           PyExc_Exception, nullptr);
  m.attr("InterventionError") = py::handle(g_intervention_error);
  m.attr("EarlyStop") = py::handle(g_early_stop);
  py::register_exception_translator(&translate);

  m.def("set_proxy_type", &set_proxy_type);

  py::class_<PyPlan>(m, "Plan")
      .def_property_readonly("sites",
                             [](const PyPlan& p) {
                               py::list out;
                               for (const auto& s : p.plan->sites) out.append(py::make_tuple(s.key.module, static_cast<int>(s.key.kind)));
                               return out;
                             })
      .def_property_readonly("num_nodes", [](const PyPlan& p) { return p.plan->size(); })
      .def("serialize", [](const PyPlan& p) { return py::bytes(serialize_graph(*p.plan->graph)); })
      .def("write", [](const PyPlan& p, const std::string& path) { save_graph(*p.plan->graph, path); });

  m.def(
      "compile",
      [](py::list nodes, py::list sites, py::list invokers, int64_t batch_size, py::list saved, py::list lines,
         py::handle token) {
        auto g = build_graph(nodes, sites, invokers, batch_size, saved, lines, token);
        return PyPlan{compile(std::move(g))};
      },
      py::arg("nodes"), py::arg("sites"), py::arg("invokers"), py::arg("batch_size"), py::arg("saved"),
      py::arg("lines"), py::arg("token"));

  add_fast_function(m, &g_run_trace_def);
  m.def("plan_of", &plan_of, py::arg("handle"));

  m.def("load_plan", [](py::bytes data) { return PyPlan{compile(std::make_shared<Graph>(deserialize_graph(data)))}; });

  register_site_hook(m);

  py::class_<PyRun, std::shared_ptr<PyRun>>(m, "Run")
      .def(py::init<const PyPlan&, py::list, bool>(), py::arg("plan"), py::arg("fns"), py::arg("allow_fallback") = true)
      .def("begin", [](PyRun& r) { r.run().begin(); }, py::call_guard<py::gil_scoped_release>())
      .def("end", [](PyRun& r) { r.run().end(); }, py::call_guard<py::gil_scoped_release>())
      .def("end_stopped", [](PyRun& r) { r.run().end_stopped(); })
      .def("release",
           [](PyRun& r) {
             detach(r);
             r.run().release();
           })
      .def("done", [](PyRun& r, int32_t node) { return r.run().done(node); })
      .def("values",
           [](PyRun& r, py::list nodes) {
             // {node: value} for the given nodes that have one (the saved values, at the end).
             py::dict out;
             for (py::handle h : nodes) {
               auto node = h.cast<int32_t>();
               if (r.run().has_value(node)) out[h] = r.value(node);
             }
             return out;
           })
      .def("calls", [](PyRun& r, int32_t site) { return r.run().calls(site); });

  m.def("save_tensors", [](const std::string& path, py::list items) {
    NamedTensors ts;
    for (py::handle item : items) {
      auto pair = item.cast<py::tuple>();
      c10::IValue v = to_ivalue(pair[1]);
      if (!v.isTensor()) throw std::invalid_argument("save_tensors: values must be tensors");
      ts.emplace_back(pair[0].cast<std::string>(), v.toTensor());
    }
    write_file(path, serialize_tensors(ts));
  });
  m.def("load_tensors", [](const std::string& path) {
    py::list out;
    for (auto& [name, t] : deserialize_tensors(read_file(path))) out.append(py::make_tuple(name, to_python(c10::IValue(t))));
    return out;
  });
}

}  // namespace fastinterleave::python
