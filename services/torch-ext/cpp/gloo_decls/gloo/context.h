// See ../README.md: only what c10d's ProcessGroupGloo.hpp needs to parse. The one member is
// named by an inline ProcessGroupGloo::setTimeout that the shim never calls, so nothing here
// is ever referenced from the object code.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
