//! Random ids and bearer tokens, and the SHA-256 under which tokens are stored.

use rand::distr::{Alphanumeric, SampleString};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// 18 random bytes for a `lathe_core` id (`FileId::from_random`, …).
pub(crate) fn id_bytes() -> [u8; 18] {
    let mut bytes = [0u8; 18];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// `prefix` followed by `len` random letters and digits.
pub(crate) fn alphanumeric(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", Alphanumeric.sample_string(&mut rand::rng(), len))
}

/// A bearer token: 43 alphanumerics is ~256 bits, enough that hashing without salt is safe.
pub(crate) fn token(prefix: &str) -> String {
    alphanumeric(prefix, 43)
}

pub(crate) fn sha256(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}
