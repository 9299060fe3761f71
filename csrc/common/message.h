// Error messages without iostreams, and BLOSSOM_CHECK, the check every binding uses.
//
// Why: TORCH_CHECK formats its message pieces with std::ostringstream in the including
// translation unit. In the CUDA build on the GPU machines (torch 2.11 + CUDA 13.0 wheels,
// gcc 13) inserting an integer into that stream crashed with SIGSEGV (the std::num_put
// facet; strings were fine), so a bad input with a number in its message killed the
// process instead of raising (tests/test_input_checks.py, e.g. query heads 3 with key heads
// 2). BLOSSOM_CHECK(cond, pieces...) builds the message as a std::string (numbers through
// std::to_string) only when cond fails, and hands TORCH_CHECK that one string, which it
// passes through unformatted.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace blossom {
namespace msg {

inline void put(std::string& s, const char* x) { s += x; }
inline void put(std::string& s, const std::string& x) { s += x; }
inline void put(std::string& s, char x) { s += x; }
inline void put(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename I, typename std::enable_if<std::is_integral<I>::value &&
                                                  !std::is_same<I, bool>::value &&
                                                  !std::is_same<I, char>::value,
                                              int>::type = 0>
inline void put(std::string& s, I x) {
  s += std::to_string(x);
}
inline void put(std::string& s, double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  s += buf;
}
inline void put(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, c10::IntArrayRef a) {  // "(2, 3)", like a Python tuple
  s += '(';
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  if (a.size() == 1) s += ',';
  s += ')';
}

template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (put(s, a), ...);
  return s;
}

}  // namespace msg
}  // namespace blossom

#define BLOSSOM_CHECK(cond, ...) TORCH_CHECK(cond, ::blossom::msg::cat(__VA_ARGS__))
