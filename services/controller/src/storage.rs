//! The data directory shared with the workers. Every path is made from an id the controller
//! generated, never from a user's filename:
//!
//! ```text
//! <data dir>/files/<file id>     uploaded and result files (bytes as uploaded)
//! <data dir>/jobs/<job id>/      a job's checkpoints and outputs, written by its workers
//! <data dir>/tmp/                uploads being written, renamed into files/ when complete
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ControllerError;

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    pub fn open(root: &Path) -> Result<Storage, ControllerError> {
        for dir in ["files", "jobs", "tmp"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).map_err(|source| ControllerError::DataDir { path, source })?;
        }
        // Absolute, so that the paths handed to workers mean the same thing in their processes.
        let root = std::fs::canonicalize(root).map_err(|source| ControllerError::DataDir { path: root.into(), source })?;
        Ok(Storage { root })
    }

    pub fn file_path(&self, file_id: &str) -> PathBuf {
        self.root.join("files").join(file_id)
    }

    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.root.join("jobs").join(job_id)
    }

    /// Writes `bytes` as the file `file_id`: to a temporary name, fsynced, then renamed, so a
    /// crash never leaves a half-written file under a real id. Returns the SHA-256.
    pub fn write_file(&self, file_id: &str, bytes: &[u8]) -> std::io::Result<[u8; 32]> {
        let tmp = self.root.join("tmp").join(format!("{file_id}.part"));
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(bytes)?;
        out.sync_all()?;
        std::fs::rename(&tmp, self.file_path(file_id))?;
        Ok(Sha256::digest(bytes).into())
    }

    /// Copies `source` in as the file `file_id`, streaming (model weights can be many GB) and
    /// hashing as it goes; temporary name, fsync, rename as in [`Storage::write_file`].
    /// Returns the SHA-256 and the size.
    pub fn copy_file(&self, file_id: &str, source: &Path) -> std::io::Result<([u8; 32], i64)> {
        struct Hashing<W> {
            inner: W,
            hasher: Sha256,
        }
        impl<W: Write> Write for Hashing<W> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.inner.write(buf)?;
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.inner.flush()
            }
        }
        let tmp = self.root.join("tmp").join(format!("{file_id}.part"));
        let mut input = std::fs::File::open(source)?;
        let mut out = Hashing { inner: std::io::BufWriter::new(std::fs::File::create(&tmp)?), hasher: Sha256::new() };
        let size = std::io::copy(&mut input, &mut out)?;
        let file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.file_path(file_id))?;
        Ok((out.hasher.finalize().into(), size as i64))
    }

    /// Where an upload is written while it streams in ([`crate::upload::Sink`]).
    pub fn upload_path(&self, file_id: &str) -> PathBuf {
        self.root.join("tmp").join(format!("{file_id}.upload"))
    }

    /// Moves a complete, fsynced upload into place as the file `file_id`.
    pub fn commit_upload(&self, upload: &Path, file_id: &str) -> std::io::Result<()> {
        std::fs::rename(upload, self.file_path(file_id))
    }

    pub fn remove_file(&self, file_id: &str) {
        let _ = std::fs::remove_file(self.file_path(file_id));
    }

    /// `path` (a checkpoint a worker commits), if it is an absolute path inside the job's
    /// directory with no `..`. Checked by its text: the checkpoint may be pruned later, and a
    /// resend of its commit must still be accepted.
    pub fn lexically_inside_job_dir(&self, job_id: &str, path: &str) -> Option<PathBuf> {
        let path = Path::new(path);
        let plain = path.is_absolute() && !path.components().any(|c| matches!(c, std::path::Component::ParentDir));
        (plain && path.starts_with(self.job_dir(job_id))).then(|| path.to_path_buf())
    }

    /// `path` (a file a worker asks the controller to read) resolved through symlinks, if it
    /// lies inside the job's directory.
    pub fn inside_job_dir(&self, job_id: &str, path: &str) -> Option<PathBuf> {
        let job_dir = std::fs::canonicalize(self.job_dir(job_id)).ok()?;
        let resolved = std::fs::canonicalize(path).ok()?;
        resolved.starts_with(&job_dir).then_some(resolved)
    }
}
