// One dtype dispatcher for every family: turns a runtime DType into a C++ element type.
//
//   dispatch<float, bf16, f16>(view.dtype, "mezo sweep", [&](auto tag) {
//     using T = typename decltype(tag)::type;
//     run<T>(...);
//   });
//
// Each listed type is one instantiation of the lambda's body: list only what the kernel supports.
// A dtype outside the list throws TypeError naming `what` and the dtypes it accepts.
#pragma once
#include <string>

#include "core/errors.h"
#include "core/tensor.h"

namespace llmk {

template <typename T> struct TypeTag { using type = T; };

template <typename... Types>
std::string dtype_list() {
  std::string names;
  ((names += (names.empty() ? "" : ", ") + std::string(dtype_name(dtype_of<Types>()))), ...);
  return names;
}

template <typename... Types, typename Fn>
void dispatch(DType dtype, const char* what, Fn&& fn) {
  const bool matched = ((dtype == dtype_of<Types>() ? (fn(TypeTag<Types>{}), true) : false) || ...);
  LLMK_CHECK(matched, TypeError, what, ": unsupported dtype ", dtype_name(dtype), " (supported: ",
             dtype_list<Types...>(), ")");
}

// The floating types every family's kernels take.
template <typename Fn>
void dispatch_floating(DType dtype, const char* what, Fn&& fn) {
  dispatch<float, bf16, f16>(dtype, what, static_cast<Fn&&>(fn));
}

}  // namespace llmk
