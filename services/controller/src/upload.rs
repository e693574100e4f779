//! Uploads streamed to disk: the multipart body is checked for sane framing as it arrives, the
//! file part is written to a temporary file while it is hashed and validated line by line, and
//! only a complete, valid file is renamed into place. Memory per upload is bounded by one line
//! ([`MAX_LINE_BYTES`]) plus a few chunks, whatever the file's size.
//!
//! ```text
//! body ─▶ Framing (boundary within 4 KiB, part headers within 16 KiB, size limit)
//!      ─▶ multer ─▶ file part chunks ─channel─▶ Sink (spawn_blocking): tmp file + SHA-256 + LineReader
//! ```
//!
//! The framing check exists because a multipart parser that has not found its boundary (or the
//! end of a part's headers) rescans everything buffered so far on every new chunk: a body
//! without a boundary costs quadratic CPU. Refusing early keeps every scan short.

use std::io::Write;
use std::path::{Path, PathBuf};

use lathe_core::training_file::{split_lines, FileError, LineReader, MAX_LINE_BYTES};
use lathe_core::FileSummary;
use sha2::{Digest, Sha256};

/// Bytes allowed before the first boundary (clients send none; RFC 2046 allows a preamble).
pub const MAX_PREAMBLE_BYTES: usize = 4 * 1024;
/// Bytes allowed for one part's headers (`Content-Disposition`, `Content-Type`).
pub const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// Why the framing check stopped a body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("the body has no multipart boundary in its first {MAX_PREAMBLE_BYTES} bytes")]
    NoBoundary,
    #[error("a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")]
    HeadersTooLong,
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the first delimiter.
    Preamble,
    /// After a delimiter, until the blank line that ends the part's headers.
    Headers,
    /// A part's content, until the next delimiter.
    Content,
}

/// A linear scan of the body for the delimiters multer will look for, run on each chunk
/// before multer sees it.
pub struct Framing {
    /// `\r\n--boundary`: the body is scanned as if it started with `\r\n`.
    delimiter: Vec<u8>,
    stage: Stage,
    /// Bytes seen in the current stage (for the preamble and header limits).
    in_stage: usize,
    /// The end of the previous chunk, in case a delimiter spans two chunks.
    carry: Vec<u8>,
    total: usize,
    limit: usize,
}

impl Framing {
    pub fn new(boundary: &str, limit: usize) -> Framing {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        Framing { delimiter, stage: Stage::Preamble, in_stage: 0, carry: b"\r\n".to_vec(), total: 0, limit }
    }

    pub fn inspect(&mut self, chunk: &[u8]) -> Result<(), FramingError> {
        self.total += chunk.len();
        if self.total > self.limit {
            return Err(FramingError::TooLarge(self.limit));
        }
        let carried = self.carry.len();
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        let mut at = 0;
        loop {
            let pattern: &[u8] = if self.stage == Stage::Headers { b"\r\n\r\n" } else { &self.delimiter };
            let Some(found) = find(&window[at..], pattern) else { break };
            // Bytes of this stage that came before the pattern (the carry was counted already).
            self.in_stage += (at + found).saturating_sub(carried.max(at));
            self.check_stage()?;
            at += found + pattern.len();
            self.stage = if self.stage == Stage::Headers { Stage::Content } else { Stage::Headers };
            self.in_stage = 0;
        }
        self.in_stage += window.len().saturating_sub(carried.max(at));
        self.check_stage()?;
        let keep = self.delimiter.len().max(4) - 1;
        self.carry = window[at.max(window.len().saturating_sub(keep))..].to_vec();
        Ok(())
    }

    fn check_stage(&self) -> Result<(), FramingError> {
        match self.stage {
            Stage::Preamble if self.in_stage > MAX_PREAMBLE_BYTES => Err(FramingError::NoBoundary),
            Stage::Headers if self.in_stage > MAX_PART_HEADER_BYTES => Err(FramingError::HeadersTooLong),
            _ => Ok(()),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// A file part being written to `<data dir>/tmp`: hashed and validated as it is written.
/// Dropped before [`Sink::finish`] (an error, a client that went away), it removes its file.
pub struct Sink {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    reader: LineReader,
    /// The line being assembled across chunks.
    line: Vec<u8>,
    bytes: usize,
    done: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Invalid(#[from] FileError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Sink {
    pub fn create(path: PathBuf) -> Result<Sink, SinkError> {
        let file = std::fs::File::create(&path).map_err(|source| SinkError::Io { path: path.clone(), source })?;
        Ok(Sink {
            path,
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            reader: LineReader::default(),
            line: Vec::new(),
            bytes: 0,
            done: false,
        })
    }

    pub fn write(&mut self, chunk: &[u8]) -> Result<(), SinkError> {
        self.out.write_all(chunk).map_err(|source| SinkError::Io { path: self.path.clone(), source })?;
        self.hasher.update(chunk);
        self.bytes += chunk.len();
        // Whole lines inside the chunk are checked in place; only a line that spans chunks is
        // copied, and never past the longest line allowed.
        let mut rest = chunk;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            if self.line.is_empty() {
                self.reader.push(&rest[..end])?;
            } else {
                self.line.extend_from_slice(&rest[..end]);
                self.check_line_length()?;
                let line = std::mem::take(&mut self.line);
                self.reader.push(&line)?;
            }
            rest = &rest[end + 1..];
        }
        self.line.extend_from_slice(rest);
        self.check_line_length()
    }

    fn check_line_length(&self) -> Result<(), SinkError> {
        if self.line.len() > MAX_LINE_BYTES + 1 {
            return Err(self.reader.line_too_long().into());
        }
        Ok(())
    }

    /// The last line, then the summary; the file is fsynced and stays at [`Sink::path`] until
    /// the caller renames it. Returns the SHA-256 and the summary.
    pub fn finish(mut self) -> Result<(PathBuf, [u8; 32], FileSummary), SinkError> {
        let last = std::mem::take(&mut self.line);
        for line in split_lines(&last) {
            self.reader.push(line)?;
        }
        let summary = self.reader.summary(self.bytes)?;
        let io = |path: &Path, source| SinkError::Io { path: path.to_path_buf(), source };
        self.out.flush().map_err(|e| io(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| io(&self.path, e))?;
        self.done = true;
        let hash = std::mem::take(&mut self.hasher).finalize().into();
        Ok((self.path.clone(), hash, summary))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(boundary: &str, content: &str) -> Vec<u8> {
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{content}\r\n--{boundary}--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_well_formed_body_passes_in_any_chunking() {
        let bytes = body("XyZ", &"{\"text\": \"hello\"}\n".repeat(1000));
        for size in [1, 3, 7, 64, 4096, bytes.len()] {
            let mut framing = Framing::new("XyZ", 1 << 30);
            for chunk in bytes.chunks(size) {
                framing.inspect(chunk).unwrap_or_else(|e| panic!("chunks of {size}: {e}"));
            }
        }
    }

    #[test]
    fn a_body_without_its_boundary_is_refused_after_the_preamble_limit() {
        let mut framing = Framing::new("XyZ", 1 << 30);
        let chunk = vec![b'a'; 1024];
        let refused = (0..10).map(|_| framing.inspect(&chunk)).find_map(Result::err);
        assert_eq!(refused, Some(FramingError::NoBoundary));
    }

    #[test]
    fn endless_part_headers_are_refused() {
        let mut framing = Framing::new("XyZ", 1 << 30);
        framing.inspect(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n").unwrap();
        let header = format!("X-Pad: {}\r\n", "p".repeat(1000));
        let refused = (0..20).map(|_| framing.inspect(header.as_bytes())).find_map(Result::err);
        assert_eq!(refused, Some(FramingError::HeadersTooLong));
    }

    #[test]
    fn the_size_limit_counts_every_byte() {
        let mut framing = Framing::new("XyZ", 100);
        assert_eq!(framing.inspect(&body("XyZ", &"x".repeat(200))), Err(FramingError::TooLarge(100)));
    }

    #[test]
    fn the_sink_validates_lines_across_chunks_and_removes_a_refused_file() {
        let dir = std::env::temp_dir().join(format!("lathe-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Blank lines, and a last line without its newline.
        let content = "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n".repeat(3).trim_end().to_string();
        let path = dir.join("ok.part");
        let mut sink = Sink::create(path.clone()).unwrap();
        for chunk in content.as_bytes().chunks(5) {
            sink.write(chunk).unwrap();
        }
        let (written, hash, summary) = sink.finish().unwrap();
        assert_eq!(std::fs::read(&written).unwrap(), content.as_bytes());
        let expected: [u8; 32] = Sha256::digest(content.as_bytes()).into();
        assert_eq!(hash, expected);
        assert_eq!(lathe_core::training_file::validate_jsonl(content.as_bytes()), Ok(summary));

        let bad = dir.join("bad.part");
        let mut sink = Sink::create(bad.clone()).unwrap();
        let error = sink.write(b"{\"text\": \"a\"}\n{\"text\": 1}\n").unwrap_err().to_string();
        assert!(error.starts_with("line 2:"), "{error}");
        drop(sink);
        assert!(!bad.exists(), "a refused upload leaves nothing behind");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
