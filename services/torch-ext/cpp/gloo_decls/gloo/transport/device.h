// See ../../README.md: only what c10d's ProcessGroupGloo.hpp needs to parse.
#pragma once
namespace gloo::transport {
class Device;
class UnboundBuffer;
}  // namespace gloo::transport
