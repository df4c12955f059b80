// The Python module harmodt_fast._C: thin bindings over the ops declared in harmodt.h.
#include <torch/extension.h>

#include "harmodt.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "harmodt_fast C++ ops (mask packing, harmony mask update)";
  m.def("pack_masks", &harmodt::pack_masks, "bool [T, P] -> int32 [T, ceil(P/32)]");
  m.def("unpack_masks", &harmodt::unpack_masks, "int32 [T, W], P -> bool [T, P]");
  m.def("score_ids", &harmodt::score_ids, "the harmony scores this op implements, name -> id");
  py::class_<harmodt::HarmonyState>(m, "HarmonyState", "the harmony update's selection, fed task rows (harmony.cpp)")
      .def(py::init<int64_t, torch::Tensor, std::vector<int64_t>, double, int64_t>(), py::arg("P"),
           py::arg("masks_packed"), py::arg("ks"), py::arg("gamma"), py::arg("score"))
      .def("feed_rows", &harmodt::HarmonyState::feed_rows, py::arg("weight"), py::arg("grads"), py::arg("gbar"),
           py::arg("first_task"), py::arg("offset"), py::call_guard<py::gil_scoped_release>())
      .def("candidates", &harmodt::HarmonyState::candidates, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("k", &harmodt::HarmonyState::k);
  m.def("task_agreement", &harmodt::task_agreement, "grads [T, P] -> float64 [T, T] cosine similarity",
        py::call_guard<py::gil_scoped_release>());
}
