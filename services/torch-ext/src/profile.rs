//! libtorch's op profiler (`cpp/profile.cpp`): what each ATen op of a training step costs,
//! written as a Chrome trace in the format torch.profiler exports, so one script compares
//! Lathe's ops with transformers'.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use tch::TchError;

use crate::ffi;

const ERR_LEN: usize = 1024;

/// Records ops from [`OpProfile::start`] until [`OpProfile::finish`] writes the trace.
pub struct OpProfile {
    path: PathBuf,
}

impl OpProfile {
    pub fn start(path: &Path) -> Result<Self, TchError> {
        let mut err = [0 as c_char; ERR_LEN];
        if unsafe { ffi::lathe_profiler_start(err.as_mut_ptr(), ERR_LEN) } != 0 {
            return Err(error("starting the profiler", &err));
        }
        Ok(OpProfile { path: path.to_path_buf() })
    }

    /// Stops recording and writes the trace.
    pub fn finish(self) -> Result<PathBuf, TchError> {
        let c_path = CString::new(self.path.to_string_lossy().as_bytes()).map_err(|e| TchError::Convert(e.to_string()))?;
        let mut err = [0 as c_char; ERR_LEN];
        if unsafe { ffi::lathe_profiler_stop(c_path.as_ptr(), err.as_mut_ptr(), ERR_LEN) } != 0 {
            return Err(error("writing the profile", &err));
        }
        Ok(self.path)
    }
}

fn error(what: &str, err: &[c_char]) -> TchError {
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    TchError::Torch(format!("{what}: {message}"))
}
