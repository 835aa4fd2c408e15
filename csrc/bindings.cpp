// The only pybind11 file: one def per entry point. Tensors arrive as DLPack capsules
// ("dltensor", borrowed: the capsule keeps ownership and frees the tensor) and become TensorViews.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/gaussian.h"
#include "common/philox.h"
#include "core/errors.h"
#include "core/tensor.h"
#include "mezo/mezo.h"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(LLMK_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace llmk;

namespace {

TensorView view(const py::handle& capsule, const std::string& name) {
  if (!PyCapsule_CheckExact(capsule.ptr()) || !PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    throw TypeError(name + " must be an unconsumed DLPack capsule (\"dltensor\")");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  return view_from_dlpack(managed, name);
}

py::dict build_info() {
  py::dict info;
  info["version"] = LLMK_VERSION;
  info["git_commit"] = LLMK_GIT_COMMIT;
  info["cpu_backend"] = true;
#if defined(_OPENMP)
  info["openmp"] = true;
  info["openmp_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_threads"] = 1;
#endif
#if defined(LLMK_WITH_CUDA)
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(LLMK_CUDA_ARCHS_STR);
  int runtime = 0, driver = 0, devices = 0;
  cudaRuntimeGetVersion(&runtime);
  info["cuda_runtime_version"] = std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  info["cuda_driver_version"] = driver ? std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) : "none";
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    devices = 0;
    cudaGetLastError();  // clear the error a machine without a GPU or driver reports
  }
  info["cuda_device_count"] = devices;
  info["gpu_usable"] = devices > 0;
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime_version"] = "none";
  info["cuda_driver_version"] = "none";
  info["cuda_device_count"] = 0;
  info["gpu_usable"] = false;
#endif
  return info;
}

void mezo_sweep(const py::list& params, const std::vector<int64_t>& indices,
                const std::vector<double>& shrink, const std::vector<double>& coef_a,
                const std::vector<double>& coef_b, int64_t seed, const py::object& seed_tensor,
                double grad, const py::object& grad_tensor, bool has_next, int64_t next_seed,
                const py::object& next_seed_tensor, double next_scale, uintptr_t stream) {
  std::vector<TensorView> views;
  views.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) views.push_back(view(params[k], "params[" + std::to_string(k) + "]"));
  TensorView seed_view, grad_view, next_seed_view;
  const bool has_seed_tensor = !seed_tensor.is_none(), has_grad_tensor = !grad_tensor.is_none(),
             has_next_seed_tensor = !next_seed_tensor.is_none();
  if (has_seed_tensor) seed_view = view(seed_tensor, "seed");
  if (has_grad_tensor) grad_view = view(grad_tensor, "projected_grad");
  if (has_next_seed_tensor) next_seed_view = view(next_seed_tensor, "next_seed");
  mezo::SweepScalars scalars;
  scalars.seed.value = uint64_t(seed);  // seeds are 64-bit patterns (two's complement)
  scalars.grad.value = float(grad);
  scalars.has_next = has_next;
  scalars.next_seed.value = uint64_t(next_seed);
  scalars.next_scale = float(next_scale);
  py::gil_scoped_release no_gil;
  mezo::sweep(views, indices, shrink, coef_a, coef_b, scalars, has_seed_tensor ? &seed_view : nullptr,
              has_grad_tensor ? &grad_view : nullptr, has_next_seed_tensor ? &next_seed_view : nullptr,
              reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmkernels native core (torch-free; tensors cross as DLPack capsules)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llmk::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const llmk::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const llmk::DeviceError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("build_info", &build_info, "What this build contains and whether a GPU is usable now");

  m.def("philox4x32_10", [](std::vector<uint32_t> counter, std::vector<uint32_t> key) {
        if (counter.size() != 4 || key.size() != 2)
          throw ValueError("philox4x32_10 expects a counter of 4 words and a key of 2 words");
        const Philox4 out = philox4x32_10(Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
        return std::vector<uint32_t>(out.x, out.x + 4);
      }, py::arg("counter"), py::arg("key"),
      "Philox4x32-10 of one 128-bit counter under a 64-bit key (the generator in common/philox.h)");

  m.def("normal4_scalar", [](uint64_t seed, uint32_t tensor_index, uint64_t first_group, int64_t num_groups) {
        if (num_groups < 0) throw ValueError("num_groups must be >= 0");
        const PhiloxKey key = PhiloxKey::from_seed(seed);
        std::vector<float> out;
        out.reserve(size_t(num_groups) * 4);
        for (int64_t g = 0; g < num_groups; ++g) {
          const Normal4 z = normal4(key, tensor_index, first_group + uint64_t(g));
          out.insert(out.end(), z.z, z.z + 4);
        }
        return out;
      }, py::arg("seed"), py::arg("tensor_index"), py::arg("first_group"), py::arg("num_groups"),
      "z for 4*num_groups elements through the scalar normal4() (the code path the CUDA kernel runs), "
      "to check the vectorized CPU kernel against it bit for bit");

  m.def("mezo_sweep", &mezo_sweep, py::arg("params"), py::arg("indices"), py::arg("shrink"),
        py::arg("coef_a"), py::arg("coef_b"), py::arg("seed"), py::arg("seed_tensor"),
        py::arg("grad"), py::arg("grad_tensor"), py::arg("has_next"), py::arg("next_seed"),
        py::arg("next_seed_tensor"), py::arg("next_scale"), py::arg("stream"),
        "theta <- theta + (coef_a - coef_b*g)*z(seed) - shrink*theta [+ next_scale*z(next_seed)] over a tensor list");
}
