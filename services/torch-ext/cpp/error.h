// How the shim's extern "C" entry points report a failure: the exception's message copied into
// the caller's buffer (always NUL-terminated), which the Rust side reads with `CStr`.
#pragma once

#include <cstddef>
#include <cstring>

namespace lathe {

inline void write_error(char* err, size_t err_len, const char* what) {
    if (err != nullptr && err_len > 0) {
        std::strncpy(err, what, err_len - 1);
        err[err_len - 1] = '\0';
    }
}

}  // namespace lathe
