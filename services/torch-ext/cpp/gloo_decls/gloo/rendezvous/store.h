// See ../../README.md: only what c10d's ProcessGroupGloo.hpp needs to parse. The store
// interface ProcessGroupGloo::GlooStore overrides; without GLOO_STORE_HAS_STORE_V2 the header
// leaves out the v2 methods, which is fine since the shim never creates a GlooStore.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo::rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace gloo::rendezvous
