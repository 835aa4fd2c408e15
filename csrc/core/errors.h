// Exceptions that cross into Python with the right type (bindings.cpp registers the mapping):
// ValueError for shapes and values, TypeError for dtypes, RuntimeError for device problems.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace llmk {

struct ValueError : std::runtime_error { using std::runtime_error::runtime_error; };
struct TypeError : std::runtime_error { using std::runtime_error::runtime_error; };
struct DeviceError : std::runtime_error { using std::runtime_error::runtime_error; };
// A kernel running under the SIMT emulator broke a rule the hardware or compute-sanitizer would
// catch (out-of-bounds access, race, deadlock, refused launch): csrc/emu/.
struct EmulatorError : std::runtime_error { using std::runtime_error::runtime_error; };

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

}  // namespace llmk

// LLMK_CHECK(cond, ValueError, "params[", i, "] must be contiguous, got strides ", ...)
#define LLMK_CHECK(cond, Kind, ...)                                   \
  do {                                                                \
    if (!(cond)) throw ::llmk::Kind(::llmk::detail::concat(__VA_ARGS__)); \
  } while (0)
