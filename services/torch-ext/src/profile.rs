//! libtorch's op profiler (`cpp/profile.cpp`): what each ATen op of a training step costs,
//! written as a Chrome trace in the format torch.profiler exports, so one script compares
//! Lathe's ops with transformers'.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use tch::TchError;

use crate::ffi;

/// Records ops from [`OpProfile::start`] until [`OpProfile::finish`] writes the trace.
pub struct OpProfile {
    path: PathBuf,
}

impl OpProfile {
    pub fn start(path: &Path) -> Result<Self, TchError> {
        ffi::status(|err, len| unsafe { ffi::lathe_profiler_start(err, len) }).map_err(|m| error("starting the profiler", m))?;
        Ok(OpProfile { path: path.to_path_buf() })
    }

    /// Stops recording and writes the trace.
    pub fn finish(self) -> Result<PathBuf, TchError> {
        let c_path = CString::new(self.path.to_string_lossy().as_bytes()).map_err(|e| TchError::Convert(e.to_string()))?;
        ffi::status(|err, len| unsafe { ffi::lathe_profiler_stop(c_path.as_ptr(), err, len) })
            .map_err(|m| error("writing the profile", m))?;
        Ok(self.path)
    }
}

fn error(what: &str, message: String) -> TchError {
    TchError::Torch(format!("{what}: {message}"))
}
