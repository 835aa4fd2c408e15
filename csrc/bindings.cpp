// The only pybind11 file: one def per entry point. Tensors arrive as DLPack capsules
// ("dltensor", borrowed: the capsule keeps ownership and frees the tensor) and become TensorViews.
// Test-only hooks live in the `testing` submodule, not in the public module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "common/gaussian.h"
#include "common/philox.h"
#include "common/segments.h"
#include "core/cuda_info.h"
#include "core/errors.h"
#include "core/tensor.h"
#include "emu/emulator.h"
#include "mezo/mezo.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;
using namespace llmk;

namespace {

// -- tensors in: a capsule, a list of capsules, or an optional capsule (None) -------------------

TensorView tensor(const py::handle& capsule, const std::string& name) {
  if (!PyCapsule_CheckExact(capsule.ptr()) || !PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    throw TypeError(name + " must be an unconsumed DLPack capsule (\"dltensor\")");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  return view_from_dlpack(managed, name);
}

std::vector<TensorView> tensor_list(const py::list& capsules, const std::string& name) {
  std::vector<TensorView> views;
  views.reserve(capsules.size());
  for (size_t k = 0; k < capsules.size(); ++k)
    views.push_back(tensor(capsules[k], name + "[" + std::to_string(k) + "]"));
  return views;
}

std::optional<TensorView> optional_tensor(const py::object& capsule, const std::string& name) {
  if (capsule.is_none()) return std::nullopt;
  return tensor(capsule, name);
}

const TensorView* pointer(const std::optional<TensorView>& view) { return view ? &*view : nullptr; }

void* stream_pointer(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// -- what this build is (no driver call: importing must not initialise CUDA) ----------------------

py::dict build_config() {
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
  info["cuda_compiled"] = kCudaBuilt;
  info["cuda_archs"] = std::string(LLMK_CUDA_ARCHS_STR);
  return info;
}

// -- families ----------------------------------------------------------------------------------

void mezo_sweep(const py::list& params, const std::vector<int64_t>& indices,
                const std::vector<double>& shrink, const std::vector<double>& coef_a,
                const std::vector<double>& coef_b, int64_t seed, const py::object& seed_tensor,
                double grad, const py::object& grad_tensor, double restore_scale, bool has_next,
                int64_t next_seed, const py::object& next_seed_tensor, double next_scale,
                uintptr_t stream) {
  const std::vector<TensorView> views = tensor_list(params, "params");
  const auto seed_view = optional_tensor(seed_tensor, "seed");
  const auto grad_view = optional_tensor(grad_tensor, "projected_grad");
  const auto next_seed_view = optional_tensor(next_seed_tensor, "next_seed");
  mezo::SweepScalars scalars;
  scalars.seed.value = uint64_t(seed);  // seeds are 64-bit patterns (two's complement)
  scalars.grad.value = float(grad);
  scalars.restore_scale = float(restore_scale);
  scalars.has_next = has_next;
  scalars.next_seed.value = uint64_t(next_seed);
  scalars.next_scale = float(next_scale);
  py::gil_scoped_release no_gil;
  mezo::sweep(views, indices, shrink, coef_a, coef_b, scalars, pointer(seed_view), pointer(grad_view),
              pointer(next_seed_view), stream_pointer(stream));
}

// -- the SIMT emulator: which backend CPU tensors run, its schedule, and what it saw ----------------

void def_emulator(py::module_& m) {
  py::module_ e = m.def_submodule("emulator", "The SIMT emulator that runs the CUDA kernels on CPU tensors");
  e.def("settings", [] {
        const emu::Settings s = emu::settings();
        return py::make_tuple(s.enabled, s.schedule == emu::Schedule::shuffled ? "shuffled" : "ordered", s.seed);
      }, "(enabled, schedule, seed)");
  e.def("set_settings", [](bool enabled, const std::string& schedule, uint64_t seed) {
        if (schedule != "ordered" && schedule != "shuffled")
          throw ValueError("schedule must be 'ordered' or 'shuffled'; got '" + schedule + "'");
        emu::set_settings(emu::Settings{enabled, schedule == "shuffled" ? emu::Schedule::shuffled : emu::Schedule::ordered, seed});
      }, py::arg("enabled"), py::arg("schedule"), py::arg("seed"),
      "While enabled, CPU tensors run the CUDA kernels under the emulator instead of the CPU kernels");
  e.def("report", [] {
        py::list out;
        for (const emu::KernelReport& r : emu::report()) {
          py::dict d;
          d["kernel"] = r.kernel;
          d["launches"] = r.launches;
          d["blocks"] = r.blocks;
          d["threads"] = r.threads;
          d["shared_accesses"] = r.shared_accesses;
          d["shared_wavefronts"] = r.shared_wavefronts;
          d["shared_ideal_wavefronts"] = r.shared_ideal_wavefronts;
          py::dict sites;
          for (const auto& [site, extra] : r.conflicts_by_site) sites[py::str(site)] = extra;
          d["bank_conflicts_by_site"] = sites;
          out.append(d);
        }
        return out;
      }, "Per kernel since the last reset: launches, blocks, threads, warp-wide shared accesses, their "
         "wavefronts against the conflict-free ideal, and the extra wavefronts (bank conflicts) by source line");
  e.def("reset_report", &emu::reset_report);
}

void def_testing(py::module_& m) {
  py::module_ t = m.def_submodule("testing", "Hooks for the tests: not part of the API");

  t.def("philox4x32_10", [](std::vector<uint32_t> counter, std::vector<uint32_t> key) {
        if (counter.size() != 4 || key.size() != 2)
          throw ValueError("philox4x32_10 expects a counter of 4 words and a key of 2 words");
        const Philox4 out = philox4x32_10(Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
        return std::vector<uint32_t>(out.x, out.x + 4);
      }, py::arg("counter"), py::arg("key"),
      "Philox4x32-10 of one 128-bit counter under a 64-bit key (the generator in common/philox.h)");

  t.def("normal4_scalar", [](uint64_t seed, uint32_t tensor_index, uint64_t first_group, int64_t num_groups) {
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

  t.def("find_segment", [](const std::vector<int64_t>& begins, int64_t item) {
        if (begins.size() < 2 || item < begins.front() || item >= begins.back())
          throw ValueError("find_segment needs begins[0] <= item < begins[-1]");
        return find_segment(begins.data(), int(begins.size() - 1), item);
      }, py::arg("begins"), py::arg("item"), "common/segments.h: the segment of sorted prefix sums holding item");

  t.def("layout", [](const py::object& capsule) {
        const TensorView v = tensor(capsule, "x");
        return py::make_tuple(v.is_contiguous(), v.is_dense());
      }, py::arg("x"), "(is_contiguous, is_dense) of a tensor as the core sees it");

  t.def("check_view", [](const py::object& capsule, const std::string& name, std::vector<int64_t> shape,
                         const std::string& dtype) {
        const TensorView v = tensor(capsule, name);
        if (shape.size() == 1) v.check_shape({shape[0]});
        else if (shape.size() == 2) v.check_shape({shape[0], shape[1]});
        else throw ValueError("check_view takes shapes of 1 or 2 dimensions");
        if (dtype == "float32") v.data<float>();
        else if (dtype == "bfloat16") v.data<bf16>();
        else throw ValueError("check_view takes float32 or bfloat16");
      }, py::arg("x"), py::arg("name"), py::arg("shape"), py::arg("dtype"),
      "TensorView::check_shape and data<T>() on a tensor, for their error messages");

  t.def("cuda_driver_queries", &cuda_driver_queries,
        "How many CUDA runtime/driver queries this process made (0 right after import)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmkernels native core (torch-free; tensors cross as DLPack capsules)";
  m.attr("__version__") = LLMK_VERSION;
  // A kernel under the emulator broke a rule (a RuntimeError, as a CUDA error would be).
  static py::handle emulator_error =
      py::exception<llmk::EmulatorError>(m, "EmulatorError", PyExc_RuntimeError).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llmk::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const llmk::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const llmk::DeviceError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const llmk::EmulatorError& e) {
      PyErr_SetString(emulator_error.ptr(), e.what());
    }
  });

  m.def("build_config", &build_config, "What this build contains (no driver call)");
  m.def("cuda_versions", [] {
        const CudaVersions v = cuda_versions();
        return py::make_tuple(v.runtime, v.driver);
      }, "(runtime, driver) CUDA versions; queries the driver");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices the runtime sees (0 without a driver)");
  m.def("cuda_unusable_reason", &cuda_unusable_reason, py::arg("device"),
        "'' when this build's CUDA kernels can run on the device, otherwise why not");

  m.def("mezo_sweep", &mezo_sweep, py::arg("params"), py::arg("indices"), py::arg("shrink"),
        py::arg("coef_a"), py::arg("coef_b"), py::arg("seed"), py::arg("seed_tensor"),
        py::arg("grad"), py::arg("grad_tensor"), py::arg("restore_scale"), py::arg("has_next"),
        py::arg("next_seed"), py::arg("next_seed_tensor"), py::arg("next_scale"), py::arg("stream"),
        "theta <- theta + (coef_a - coef_b*g)*z(seed) - shrink*theta [+ next_scale*z(next_seed)] over a "
        "tensor list; theta + restore_scale*z [+ ...] instead when g is not finite");

  def_emulator(m);
  def_testing(m);
}
