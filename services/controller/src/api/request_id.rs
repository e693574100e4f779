//! A request id for every REST call: taken from the client's `X-Request-Id` when it sends a
//! sane one (so a proxy's or a client's id carries through), otherwise made here. It names the
//! request's tracing span (every log line of the request carries it), comes back in the
//! `x-request-id` response header (which the openai SDK exposes as `request_id`), and is in
//! every error envelope, so a user's report can be matched to the server's logs.

use axum::http::HeaderMap;
use rand::distr::{Alphanumeric, SampleString};

pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request this task is serving (set by the API's middleware).
    pub static CURRENT: String;
}

/// The client's id if it is 1–64 characters of `[A-Za-z0-9._:-]`, else a new `req_…`.
pub fn from_headers(headers: &HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", Alphanumeric.sample_string(&mut rand::rng(), 24)))
}

/// The id of the request being served, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(|id| id.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept_and_anything_else_replaced() {
        let mut headers = HeaderMap::new();
        assert!(from_headers(&headers).starts_with("req_"));
        headers.insert(HEADER, "trace-42:a.b".parse().unwrap());
        assert_eq!(from_headers(&headers), "trace-42:a.b");
        for bad in ["", "has space", &"x".repeat(65), "semi;colon"] {
            headers.insert(HEADER, bad.parse().unwrap());
            let id = from_headers(&headers);
            assert!(id.starts_with("req_") && id.len() == 28, "{bad:?} -> {id}");
        }
    }
}
