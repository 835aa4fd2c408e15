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
#include "attention/attention.h"
#include "gemm/gemm.h"
#include "mezo/mezo.h"
#include "quant/quant.h"
#include "lora/lora.h"
#include "moe/moe.h"
#include "testing/emulator_kernels.h"
#include "testing/vocabulary_kernels.h"

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

void gemm_core(const py::object& a, const py::object& a_rows, const py::object& b, const py::object& bias,
          const py::object& row_scale, const py::object& col_scale, int64_t activation, bool accumulate,
          const py::object& out, const py::object& workspace, bool b_k_major, uintptr_t stream) {
  if (activation < 0 || activation > 3)
    throw ValueError("activation must be 0 (none), 1 (silu), 2 (gelu) or 3 (swiglu); got " + std::to_string(activation));
  const TensorView a_view = tensor(a, "a");
  const auto rows_view = optional_tensor(a_rows, "a_rows");
  const TensorView b_view = tensor(b, "b");
  const auto bias_view = optional_tensor(bias, "bias");
  const auto row_scale_view = optional_tensor(row_scale, "row_scale");
  const auto col_scale_view = optional_tensor(col_scale, "col_scale");
  const TensorView workspace_view = tensor(workspace, "workspace");
  const TensorView out_view = tensor(out, "out");
  py::gil_scoped_release no_gil;
  gemm::gemm(a_view, pointer(rows_view), b_view, out_view, pointer(bias_view), pointer(row_scale_view),
             pointer(col_scale_view), static_cast<gemm::Activation>(activation), accumulate, workspace_view,
             b_k_major, stream_pointer(stream));
}

// -- the SIMT emulator: which backend CPU tensors run, its schedule, and what it saw ----------------

void attention_forward(const py::object& q, const py::object& k, const py::object& v, const py::object& cu_seqlens_q,
                       const py::object& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                       double softcap, bool causal, int64_t window_left, int64_t window_right,
                       const py::object& alibi_slopes, bool /*deterministic: the backward's*/,
                       const py::object& out, const py::object& lse, uintptr_t stream) {
  const TensorView q_view = tensor(q, "q"), k_view = tensor(k, "k"), v_view = tensor(v, "v");
  const auto cu_q = optional_tensor(cu_seqlens_q, "cu_seqlens_q");
  const auto cu_k = optional_tensor(cu_seqlens_k, "cu_seqlens_k");
  const auto slopes = optional_tensor(alibi_slopes, "alibi_slopes");
  const TensorView out_view = tensor(out, "out");
  const auto lse_view = optional_tensor(lse, "lse");
  py::gil_scoped_release no_gil;
  attention::forward(q_view, k_view, v_view, pointer(cu_q), pointer(cu_k), max_seqlen_q, max_seqlen_k, out_view,
                     pointer(lse_view), scale, softcap, causal, window_left, window_right, pointer(slopes),
                     stream_pointer(stream));
}

void attention_backward(const py::object& dout, const py::object& q, const py::object& k, const py::object& v,
                        const py::object& out, const py::object& lse, const py::object& dlse,
                        const py::object& cu_seqlens_q, const py::object& cu_seqlens_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, double scale, double softcap, bool causal, int64_t window_left,
                        int64_t window_right, const py::object& alibi_slopes, bool deterministic,
                        const py::object& dq, const py::object& dk, const py::object& dv, const py::object& delta,
                        const py::object& dq_accum, uintptr_t stream) {
  const TensorView dout_view = tensor(dout, "dout"), q_view = tensor(q, "q"), k_view = tensor(k, "k");
  const TensorView v_view = tensor(v, "v"), out_view = tensor(out, "out"), lse_view = tensor(lse, "lse");
  const auto dlse_view = optional_tensor(dlse, "dlse");
  const auto cu_q = optional_tensor(cu_seqlens_q, "cu_seqlens_q");
  const auto cu_k = optional_tensor(cu_seqlens_k, "cu_seqlens_k");
  const auto slopes = optional_tensor(alibi_slopes, "alibi_slopes");
  const TensorView dq_view = tensor(dq, "dq"), dk_view = tensor(dk, "dk"), dv_view = tensor(dv, "dv");
  const TensorView delta_view = tensor(delta, "delta"), dq_accum_view = tensor(dq_accum, "dq_accum");
  py::gil_scoped_release no_gil;
  attention::backward(dout_view, q_view, k_view, v_view, out_view, lse_view, pointer(dlse_view), pointer(cu_q),
                      pointer(cu_k), max_seqlen_q, max_seqlen_k, dq_view, dk_view, dv_view, scale, softcap, causal,
                      window_left, window_right, pointer(slopes), deterministic, &delta_view, &dq_accum_view,
                      stream_pointer(stream));
}

void quant_quantize_int4(const py::object& w, int64_t group_size, bool symmetric, const py::object& /*scale_dtype*/,
                         const py::object& packed, const py::object& scales, const py::object& zeros, uintptr_t stream) {
  const TensorView w_view = tensor(w, "w"), packed_view = tensor(packed, "packed");
  const TensorView scales_view = tensor(scales, "scales"), zeros_view = tensor(zeros, "zeros");
  py::gil_scoped_release no_gil;
  quant::quantize_int4(w_view, group_size, symmetric, packed_view, scales_view, zeros_view, stream_pointer(stream));
}

void quant_pack_int4(const py::object& codes, const py::object& packed, uintptr_t stream) {
  const TensorView codes_view = tensor(codes, "codes"), packed_view = tensor(packed, "packed");
  py::gil_scoped_release no_gil;
  quant::pack_int4(codes_view, packed_view, stream_pointer(stream));
}

void quant_unpack_int4(const py::object& packed, int64_t /*k: codes' shape says it*/, const py::object& codes,
                       uintptr_t stream) {
  const TensorView packed_view = tensor(packed, "packed"), codes_view = tensor(codes, "codes");
  py::gil_scoped_release no_gil;
  quant::unpack_int4(packed_view, codes_view, stream_pointer(stream));
}

void quant_int4_linear(const py::object& x, const py::object& packed, const py::object& scales,
                       const py::object& zeros, int64_t group_size, const py::object& bias, const py::object& out,
                       const py::object& workspace, uintptr_t stream) {
  const TensorView x_view = tensor(x, "x"), packed_view = tensor(packed, "packed");
  const TensorView scales_view = tensor(scales, "scales"), zeros_view = tensor(zeros, "zeros");
  const auto bias_view = optional_tensor(bias, "bias");
  const TensorView out_view = tensor(out, "out"), workspace_view = tensor(workspace, "workspace");
  py::gil_scoped_release no_gil;
  quant::int4_linear(x_view, packed_view, scales_view, zeros_view, group_size, pointer(bias_view), out_view,
                     workspace_view, stream_pointer(stream));
}

void quant_int8_matmul(const py::object& a, const py::object& b, const py::object& accumulators, uintptr_t stream) {
  const TensorView a_view = tensor(a, "a"), b_view = tensor(b, "b"), acc_view = tensor(accumulators, "accumulators");
  py::gil_scoped_release no_gil;
  quant::int8_matmul(a_view, b_view, acc_view, stream_pointer(stream));
}

void quant_int8_linear(const py::object& a, const py::object& a_scales, const py::object& b,
                       const py::object& b_scales, const py::object& bias,
                       const py::object& /*out_dtype: out's own dtype says it*/,
                       const py::object& out, uintptr_t stream) {
  const TensorView a_view = tensor(a, "a"), a_scales_view = tensor(a_scales, "a_scales");
  const TensorView b_view = tensor(b, "b"), b_scales_view = tensor(b_scales, "b_scales");
  const auto bias_view = optional_tensor(bias, "bias");
  const TensorView out_view = tensor(out, "out");
  py::gil_scoped_release no_gil;
  quant::int8_linear(a_view, a_scales_view, b_view, b_scales_view, pointer(bias_view), out_view,
                     stream_pointer(stream));
}

void quant_int8_weight_linear(const py::object& x, const py::object& w, const py::object& w_scales,
                              const py::object& bias, const py::object& out, const py::object& workspace,
                              uintptr_t stream) {
  const TensorView x_view = tensor(x, "x"), w_view = tensor(w, "weight"), scales_view = tensor(w_scales, "scales");
  const auto bias_view = optional_tensor(bias, "bias");
  const TensorView out_view = tensor(out, "out"), workspace_view = tensor(workspace, "workspace");
  py::gil_scoped_release no_gil;
  quant::int8_weight_linear(x_view, w_view, scales_view, pointer(bias_view), out_view, workspace_view,
                            stream_pointer(stream));
}

void quant_quantize_per_token(const py::object& x, const py::object& smooth, const py::object& codes,
                              const py::object& scales, uintptr_t stream) {
  const TensorView x_view = tensor(x, "x"), codes_view = tensor(codes, "codes"), scales_view = tensor(scales, "scales");
  const auto smooth_view = optional_tensor(smooth, "smooth");
  py::gil_scoped_release no_gil;
  quant::quantize_per_token(x_view, pointer(smooth_view), codes_view, scales_view, stream_pointer(stream));
}

void moe_route(const py::object& logits, int64_t top_k, bool renormalize, int64_t scoring, const py::object& weights,
               const py::object& expert_ids, const py::object& tokens_per_expert, const py::object& logsumexp,
               uintptr_t stream) {
  const TensorView logits_view = tensor(logits, "router_logits"), weights_view = tensor(weights, "weights");
  const TensorView ids_view = tensor(expert_ids, "expert_ids"), counts_view = tensor(tokens_per_expert, "tokens_per_expert");
  const TensorView lse_view = tensor(logsumexp, "router_logsumexp");
  py::gil_scoped_release no_gil;
  moe::route(logits_view, top_k, renormalize, static_cast<moe::Scoring>(scoring), weights_view, ids_view, counts_view,
             lse_view, stream_pointer(stream));
}

void moe_permute(const py::object& expert_ids, int64_t experts, int64_t block, const py::object& expert_offsets,
                 const py::object& row_token, const py::object& row_slot, const py::object& block_expert,
                 const py::object& slot_row, const py::object& workspace, uintptr_t stream) {
  const TensorView ids = tensor(expert_ids, "expert_ids"), offsets = tensor(expert_offsets, "expert_offsets");
  const TensorView token = tensor(row_token, "row_token"), slot = tensor(row_slot, "row_slot");
  const TensorView blocks = tensor(block_expert, "block_expert"), rows = tensor(slot_row, "slot_row");
  const TensorView scratch = tensor(workspace, "workspace");
  py::gil_scoped_release no_gil;
  moe::permute(ids, experts, block, offsets, token, slot, blocks, rows, scratch, stream_pointer(stream));
}

void moe_grouped_gemm(const py::object& a, const py::object& a_rows, const py::object& b, const py::object& block_expert,
                      int64_t block, const py::object& row_scale, int64_t activation, bool b_k_major,
                      bool save_pre, int64_t /*rows: out's*/, const py::object& /*out_dtype: out's*/,
                      const py::object& out, const py::object& pre, uintptr_t stream) {
  const TensorView a_view = tensor(a, "x"), b_view = tensor(b, "expert weights");
  const TensorView blocks = tensor(block_expert, "block_expert"), out_view = tensor(out, "out");
  const auto rows_view = optional_tensor(a_rows, "row_token");
  const auto scale_view = optional_tensor(row_scale, "row_scale");
  const auto pre_view = save_pre ? optional_tensor(pre, "pre") : optional_tensor(py::none(), "pre");
  py::gil_scoped_release no_gil;
  moe::grouped_gemm(a_view, pointer(rows_view), b_view, blocks, block, pointer(scale_view),
                    static_cast<gemm::Activation>(activation), b_k_major, out_view, pointer(pre_view),
                    stream_pointer(stream));
}

void moe_down_backward(const py::object& dout, const py::object& row_token, const py::object& w_down,
                       const py::object& block_expert, const py::object& pre, const py::object& row_weight,
                       int64_t activation, const py::object& dpre, const py::object& weighted_h,
                       const py::object& dweight_parts, uintptr_t stream) {
  const TensorView dout_view = tensor(dout, "dout"), token = tensor(row_token, "row_token");
  const TensorView w_view = tensor(w_down, "w_down"), blocks = tensor(block_expert, "block_expert");
  const TensorView pre_view = tensor(pre, "pre"), weight_view = tensor(row_weight, "row_weight");
  const TensorView dpre_view = tensor(dpre, "dpre"), h_view = tensor(weighted_h, "weighted_h");
  const TensorView parts_view = tensor(dweight_parts, "dweight_parts");
  py::gil_scoped_release no_gil;
  moe::down_backward(dout_view, token, w_view, blocks, pre_view, weight_view, static_cast<gemm::Activation>(activation),
                     dpre_view, h_view, parts_view, stream_pointer(stream));
}

void moe_weight_grad(const py::object& a, const py::object& a_rows, const py::object& b, const py::object& b_rows,
                     const py::object& expert_offsets, const py::object& /*out_dtype: out's*/, const py::object& out,
                     uintptr_t stream) {
  const TensorView a_view = tensor(a, "a"), b_view = tensor(b, "b");
  const TensorView offsets = tensor(expert_offsets, "expert_offsets"), out_view = tensor(out, "out");
  const auto a_rows_view = optional_tensor(a_rows, "a_rows");
  const auto b_rows_view = optional_tensor(b_rows, "b_rows");
  py::gil_scoped_release no_gil;
  moe::weight_grad(a_view, pointer(a_rows_view), b_view, pointer(b_rows_view), offsets, out_view,
                   stream_pointer(stream));
}

void lora_linear(const py::object& x, const py::object& x_lora, const py::object& weight, const py::object& lora_a,
                 const py::object& lora_b, double scale, const py::object& scales, const py::object& bias,
                 const py::object& adapter_ids, const py::object& row_order, const py::object& ranks,
                 const std::vector<int64_t>& slices,
                 const py::object& w_scales, const py::object& w_zeros, int64_t group_size,
                 bool transposed, const py::object& shrink, const py::object& out, const py::object& workspace,
                 const py::object& tiles, uintptr_t stream) {
  const TensorView x_view = tensor(x, "x"), w_view = tensor(weight, "weight");
  const auto x_lora_view = optional_tensor(x_lora, "x_lora");
  const TensorView a_view = tensor(lora_a, "lora_a"), b_view = tensor(lora_b, "lora_b");
  const TensorView s_view = tensor(shrink, "shrink"), out_view = tensor(out, "out");
  const TensorView work_view = tensor(workspace, "workspace"), tiles_view = tensor(tiles, "tiles");
  const auto bias_view = optional_tensor(bias, "bias");
  const auto scales_view = optional_tensor(scales, "scales");
  const auto ids_view = optional_tensor(adapter_ids, "adapter_ids");
  const auto ranks_view = optional_tensor(ranks, "ranks");
  const auto order_view = optional_tensor(row_order, "row_order");
  const auto w_scales_view = optional_tensor(w_scales, "weight.scales");
  const auto w_zeros_view = optional_tensor(w_zeros, "weight.zeros");
  lora::Extras extras;
  extras.int4 = {pointer(w_scales_view), pointer(w_zeros_view), group_size};
  extras.x_lora = pointer(x_lora_view);
  extras.bias = pointer(bias_view);
  extras.adapter_ids = pointer(ids_view);
  extras.ranks = pointer(ranks_view);
  extras.row_order = pointer(order_view);
  extras.scales = pointer(scales_view);
  py::gil_scoped_release no_gil;
  lora::lora_linear(x_view, w_view, a_view, b_view, scale, extras, slices, transposed, s_view, out_view, work_view,
                    tiles_view, stream_pointer(stream));
}

void lora_dropout(const py::object& x, int64_t seed, int64_t threshold, double keep_scale, const py::object& out,
                  uintptr_t stream) {
  const TensorView x_view = tensor(x, "x"), out_view = tensor(out, "out");
  LLMK_CHECK(threshold >= 0 && threshold <= int64_t(0xFFFFFFFFu), ValueError, "threshold must be a 32-bit word; got ",
             threshold);
  py::gil_scoped_release no_gil;
  lora::dropout(x_view, uint64_t(seed), uint32_t(threshold), keep_scale, out_view, stream_pointer(stream));
}

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

  t.def("emulator_kernel", [](const std::string& name, const py::object& out, const py::object& input,
                              uintptr_t stream) {
        const TensorView out_view = tensor(out, "out");
        const std::optional<TensorView> input_view = optional_tensor(input, "input");
        testing::emulator_kernel(name, out_view, pointer(input_view), stream_pointer(stream));
      }, py::arg("name"), py::arg("out"), py::arg("input") = py::none(), py::arg("stream") = 0,
      "Runs one of the emulator's test kernels (csrc/testing/emulator_kernels.h): under the emulator for "
      "CPU tensors, on the GPU for CUDA tensors");

  // The device vocabulary's test kernels (csrc/testing/vocabulary_kernels.h): emulated for CPU
  // tensors, on the GPU for CUDA tensors.
  t.def("vocab_mma", [](const py::object& a, const py::object& w, const py::object& c, const py::object& d,
                        bool via_shared, uintptr_t stream) {
        const TensorView av = tensor(a, "a"), wv = tensor(w, "w"), cv = tensor(c, "c"), dv = tensor(d, "d");
        py::gil_scoped_release no_gil;
        testing::vocabulary::mma(av, wv, cv, dv, via_shared, stream_pointer(stream));
      }, py::arg("a"), py::arg("w"), py::arg("c"), py::arg("d"), py::arg("via_shared"), py::arg("stream") = 0,
      "d = a @ w.T + c by one mma.sync (bf16/f16: m16n8k16, int8: m16n8k32)");
  t.def("vocab_ldmatrix", [](const py::object& rows, const py::object& slots, const py::object& out, int count,
                             bool transposed, uintptr_t stream) {
        const TensorView rv = tensor(rows, "rows"), sv = tensor(slots, "slots"), ov = tensor(out, "out");
        py::gil_scoped_release no_gil;
        testing::vocabulary::ldmatrix(rv, sv, ov, count, transposed, stream_pointer(stream));
      }, py::arg("rows"), py::arg("slots"), py::arg("out"), py::arg("count"), py::arg("transposed"),
      py::arg("stream") = 0, "Each lane's registers after ldmatrix(.trans).x<count>");
  t.def("vocab_cp_async", [](const py::object& source, const py::object& source_bytes, const py::object& out,
                             bool read_early, uintptr_t stream) {
        const TensorView v = tensor(source, "source"), b = tensor(source_bytes, "source_bytes"), o = tensor(out, "out");
        py::gil_scoped_release no_gil;
        testing::vocabulary::cp_async(v, b, o, read_early, stream_pointer(stream));
      }, py::arg("source"), py::arg("source_bytes"), py::arg("out"), py::arg("read_early") = false,
      py::arg("stream") = 0, "cp.async of 4/8/16 bytes in three groups, each read after its wait");
  t.def("vocab_warp_reduce", [](const py::object& x, const py::object& sum, const py::object& max, uintptr_t stream) {
        const TensorView xv = tensor(x, "x"), sv = tensor(sum, "sum"), mv = tensor(max, "max");
        py::gil_scoped_release no_gil;
        testing::vocabulary::warp_reduce(xv, sv, mv, stream_pointer(stream));
      }, py::arg("x"), py::arg("sum"), py::arg("max"), py::arg("stream") = 0, "warp_sum and warp_max of each warp");
  t.def("vocab_vector_copy", [](const py::object& source, const py::object& out, int bytes, bool once,
                                uintptr_t stream) {
        const TensorView sv = tensor(source, "source"), ov = tensor(out, "out");
        py::gil_scoped_release no_gil;
        testing::vocabulary::vector_copy(sv, ov, bytes, once, stream_pointer(stream));
      }, py::arg("source"), py::arg("out"), py::arg("bytes"), py::arg("once"), py::arg("stream") = 0,
      "Vec loads (load_global or load_global_once), reversed through shared memory, stored");
  t.def("vocab_ldmatrix_tile", [](const py::object& source, const py::object& out, bool swizzled, uintptr_t stream) {
        const TensorView sv = tensor(source, "source"), ov = tensor(out, "out");
        py::gil_scoped_release no_gil;
        testing::vocabulary::ldmatrix_tile(sv, ov, swizzled, stream_pointer(stream));
      }, py::arg("source"), py::arg("out"), py::arg("swizzled"), py::arg("stream") = 0,
      "cp.async a tile into shared memory (SwizzledTile or row-major), read it back with ldmatrix.x4");
  t.def("mma_fragment_coordinates", &testing::vocabulary::mma_fragment_coordinates, py::arg("operand"),
        "mma.h's coordinate functions: flat (row, col) per lane and element; a16, b16, c, a_s8, b_s8");
  t.def("swizzled_offsets", &testing::vocabulary::swizzled_offsets, py::arg("row_bytes"), py::arg("rows"),
        "SwizzledTile{row_bytes}.offset(row, byte) for every row and byte, row-major");

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

  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"),
        py::arg("softcap"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("alibi_slopes"), py::arg("deterministic"), py::arg("out"), py::arg("lse"), py::arg("stream"),
        "Attention forward (csrc/attention/attention.h): out and the float32 log-sum-exp");
  m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dlse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"), py::arg("causal"),
        py::arg("window_left"), py::arg("window_right"), py::arg("alibi_slopes"), py::arg("deterministic"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("dq_accum"), py::arg("stream"),
        "Attention backward (FlashAttention-2's, recomputing P from lse): dq, dk, dv; delta and dq_accum are the "
        "CUDA kernels' float32 workspaces (empty for the CPU kernel; dq_accum empty when deterministic)");
  m.def("quant_quantize_int4", &quant_quantize_int4, py::arg("w"), py::arg("group_size"), py::arg("symmetric"),
        py::arg("scale_dtype"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("stream"),
        "int4 quantization of w (N, K): packed codes, scales (groups, N), zero points (groups, N)");
  m.def("quant_pack_int4", &quant_pack_int4, py::arg("codes"), py::arg("packed"), py::arg("stream"),
        "int4 codes uint8 (N, K) -> packed int32 (N / 8, ceil(K / 32), 32), common/quant_format.h's layout");
  m.def("quant_unpack_int4", &quant_unpack_int4, py::arg("packed"), py::arg("k"), py::arg("codes"), py::arg("stream"),
        "packed int32 (N / 8, ceil(K / 32), 32) -> int4 codes uint8 (N, K)");
  m.def("quant_int4_linear", &quant_int4_linear, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("workspace"),
        py::arg("stream"),
        "W4A16: out (M, N) = x (M, K) · dequantized int4 weightᵀ (+ float32 bias); workspace: the CUDA kernel's "
        "split-K partial sums (float32)");
  m.def("quant_int4_split_limits", [] { return py::make_tuple(quant::kInt4SplitMaxRows, gemm::kSplitMaxRanges); },
        "(most rows M that split K in the W4A16 kernel, most K ranges): its workspace is at most ranges * M * N "
        "floats");
  m.def("quant_int8_matmul", &quant_int8_matmul, py::arg("a"), py::arg("b"), py::arg("accumulators"),
        py::arg("stream"), "W8A8's exact int32 accumulators a (M, K) int8 · b (N, K) int8ᵀ");
  m.def("quant_int8_weight_linear", &quant_int8_weight_linear, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("bias"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
        "W8A16: out (M, N) = (x (M, K) · int8 weight (N, K)ᵀ) * scales[n] (+ bias); workspace as quant_int4_linear's");
  m.def("quant_quantize_per_token", &quant_quantize_per_token, py::arg("x"), py::arg("smooth"), py::arg("codes"),
        py::arg("scales"), py::arg("stream"),
        "Dynamic per-token int8: x (M, K) (divided by smooth (K,) when given) -> codes int8 (M, K), scales f32 (M,)");
  m.def("quant_int8_linear", &quant_int8_linear, py::arg("a"), py::arg("a_scales"), py::arg("b"),
        py::arg("b_scales"), py::arg("bias"), py::arg("out_dtype"), py::arg("out"), py::arg("stream"),
        "W8A8: int32 accumulators scaled per token and per channel (+ bias)");
  m.def("moe_route", &moe_route, py::arg("router_logits"), py::arg("top_k"), py::arg("renormalize"),
        py::arg("scoring"), py::arg("weights"), py::arg("expert_ids"), py::arg("tokens_per_expert"),
        py::arg("router_logsumexp"), py::arg("stream"),
        "MoE router: scores (0 softmax | 1 sigmoid), top-k of the logits, weights (renormalized), per-expert "
        "counts and per-token logsumexp (csrc/moe/moe.h)");
  m.def("moe_permute", &moe_permute, py::arg("expert_ids"), py::arg("num_experts"), py::arg("block"),
        py::arg("expert_offsets"), py::arg("row_token"), py::arg("row_slot"), py::arg("block_expert"),
        py::arg("slot_row"), py::arg("workspace"), py::arg("stream"),
        "MoE block-sparse layout of a routing in worst-case buffers (csrc/moe/moe.h: permute)");
  m.def("moe_grouped_gemm", &moe_grouped_gemm, py::arg("a"), py::arg("a_rows"), py::arg("b"), py::arg("block_expert"),
        py::arg("block"), py::arg("row_scale"), py::arg("activation"), py::arg("b_k_major"), py::arg("save_pre"),
        py::arg("rows"), py::arg("out_dtype"), py::arg("out"), py::arg("pre"), py::arg("stream"),
        "MoE grouped GEMM over (expert, row-block) tiles: out[r] = epilogue(a[a_rows[r]] @ b[e]^T), or @ b[e] "
        "k-major, and the pre-activation with save_pre (csrc/moe/moe.h)");
  m.def("moe_down_backward", &moe_down_backward, py::arg("dout"), py::arg("row_token"), py::arg("w_down"),
        py::arg("block_expert"), py::arg("pre"), py::arg("row_weight"), py::arg("activation"), py::arg("dpre"),
        py::arg("weighted_h"), py::arg("dweight_parts"), py::arg("stream"),
        "MoE backward's dZ = dout W_down grouped GEMM with the activation's backward in its epilogue (csrc/moe/moe.h)");
  m.def("moe_down_tiling", [] { return py::make_tuple(moe::kDownTileColumns, moe::kDownWarpsN); },
        "moe_down_backward's tile columns and warps across them: its partial sums per row are "
        "ceil(ffn / columns) * warps");
  m.def("moe_weight_grad", &moe_weight_grad, py::arg("a"), py::arg("a_rows"), py::arg("b"), py::arg("b_rows"),
        py::arg("expert_offsets"), py::arg("out_dtype"), py::arg("out"), py::arg("stream"),
        "MoE per-expert weight gradients: out[e] = sum over expert e's rows r of a[r]^T b[r] (csrc/moe/moe.h)");
  m.def("lora_linear", &lora_linear, py::arg("x"), py::arg("x_lora"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("scale"), py::arg("scales"), py::arg("bias"), py::arg("adapter_ids"), py::arg("row_order"), py::arg("ranks"), py::arg("slices"),
        py::arg("w_scales"), py::arg("w_zeros"), py::arg("group_size"), py::arg("transposed"), py::arg("shrink"), py::arg("out"), py::arg("workspace"), py::arg("tiles"),
        py::arg("stream"),
        "LoRA-fused linear: out = x W^T + bias + per row's adapter and slice (scale x A^T) B^T, or transposed "
        "(dx, one adapter): dy W + (scale dy B) A (csrc/lora/lora.h)");
  m.def("lora_dropout", &lora_dropout, py::arg("x"), py::arg("seed"), py::arg("threshold"), py::arg("keep_scale"),
        py::arg("out"), py::arg("stream"),
        "LoRA's dropout: out = x * keep / (1 - p), the keep mask from the Philox LoRA stream (csrc/lora/lora.h)");
  m.def("lora_segment", [] { return lora::kSegment; }, "the k segment the LoRA kernels pad K and the rank to");
  m.def("lora_workspace", &lora::lora_workspace, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("rank"),
        py::arg("adapters"), py::arg("slices"), py::arg("multi"),
        "float32 elements of the LoRA kernels' split-K workspace (an upper bound)");
  m.def("lora_tiles", &lora::lora_tiles, py::arg("m"), py::arg("adapters"), py::arg("multi"),
        "int32 elements of the LoRA kernels' per-row-tile adapter lists (an upper bound; 0 without adapter ids)");
  m.def("moe_block", [] { return moe::kMoeBlock; }, "rows of the MoE grouped GEMM's blocks (the permutation's block)");
  m.def("moe_permute_chunk", [] { return moe::kPermuteChunk; },
        "pairs per block of the CUDA permutation (its workspace: (ceil(T k / chunk) + 1) E int32)");
  m.def("gemm_workspace", &gemm::split_k_workspace, py::arg("m"), py::arg("n"), py::arg("k"),
        "float32 elements of the GEMM core's split-K workspace for (m, n, k) (0: no split)");
  m.def("gemm_split_limits", [] { return py::make_tuple(gemm::kSplitMaxRows, gemm::kSplitMaxRanges); },
        "(most rows M that split K, most K ranges): the split-K workspace is at most ranges * M * N floats");
  m.def("gemm", &gemm_core, py::arg("a"), py::arg("a_rows"), py::arg("b"), py::arg("bias"), py::arg("row_scale"),
        py::arg("col_scale"), py::arg("activation"), py::arg("accumulate"), py::arg("out"), py::arg("workspace"),
        py::arg("b_k_major"), py::arg("stream"),
        "The GEMM core: out (=|+=) epilogue(A[a_rows] @ B^T) with fp32 accumulation; epilogue: scales, bias, "
        "activation 0 none | 1 silu | 2 gelu | 3 swiglu (csrc/gemm/gemm.h)");

  def_emulator(m);
  def_testing(m);
}
