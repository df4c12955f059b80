// The Python module harmodt_fast._C: thin bindings over the ops declared in harmodt.h.
#include <torch/extension.h>

#include "harmodt.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "harmodt_fast C++ ops (mask packing, harmony mask update)";
  m.def("pack_masks", &harmodt::pack_masks, "bool [T, P] -> int32 [T, ceil(P/32)]");
  m.def("unpack_masks", &harmodt::unpack_masks, "int32 [T, W], P -> bool [T, P]");
}
