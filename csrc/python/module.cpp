// The _C extension module: wires the binding areas together.
#include <pybind11/pybind11.h>

namespace fastinterleave::python {
void register_context(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_frames(pybind11::module_& m);
void register_proxy(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinterleave's engine (private: use the fastinterleave package)";
  // Checked on import against the torch that imports us.
  m.attr("TORCH_VERSION") = FASTINTERLEAVE_TORCH_VERSION;
  fastinterleave::python::register_proxy(m);
  fastinterleave::python::register_context(m);
  fastinterleave::python::register_engine(m);
  fastinterleave::python::register_frames(m);
}
