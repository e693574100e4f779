use std::fmt;

use crate::QueueError;

/// Highest priority the queue orders; the API allows -100..=100, well inside this.
pub const MAX_PRIORITY: i32 = 1023;
/// Lowest priority the queue orders.
pub const MIN_PRIORITY: i32 = -1024;

/// Sequence numbers available to one priority within one pool: 2^42, so that 2048 priorities
/// times 2^42 stay below 2^53 and every score is an exact integer in Redis's f64.
pub(crate) const BAND_WIDTH: u64 = 1 << 42;

/// A validated pool name: 1 to 64 of `a-z`, `0-9`, `-`, `_`. Pool names end up in Redis keys
/// and metric labels, so nothing else gets in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pool(String);

impl Pool {
    pub fn parse(name: &str) -> Result<Pool, QueueError> {
        let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if !(1..=64).contains(&name.len()) || !name.bytes().all(allowed) {
            return Err(QueueError::InvalidPool(name.to_string()));
        }
        Ok(Pool(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The half-open score range `[start, end)` of a priority: higher priority, lower scores, so
/// that BZPOPMIN takes it first.
pub(crate) fn priority_band(priority: i32) -> Result<(u64, u64), QueueError> {
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(QueueError::PriorityOutOfRange(priority));
    }
    let band = (MAX_PRIORITY - priority) as u64;
    Ok((band * BAND_WIDTH, (band + 1) * BAND_WIDTH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_of_lowercase_letters_digits_dash_and_underscore_are_accepted() {
        for name in ["default", "a100", "h100-80gb", "cpu_small", &"x".repeat(64)] {
            assert_eq!(Pool::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn pool_names_that_could_escape_a_key_or_label_are_rejected() {
        for name in ["", "A100", "../x", "a:b", "a b", "a*", "é", &"x".repeat(65)] {
            assert!(matches!(Pool::parse(name), Err(QueueError::InvalidPool(n)) if n == name), "{name:?}");
        }
    }

    #[test]
    fn a_higher_priority_gets_a_lower_band() {
        let (high_start, high_end) = priority_band(10).unwrap();
        let (low_start, _) = priority_band(0).unwrap();
        assert!(high_end <= low_start);
        assert_eq!(high_end - high_start, BAND_WIDTH);
    }

    #[test]
    fn every_score_of_every_band_is_an_exact_f64_integer() {
        assert_eq!(priority_band(MAX_PRIORITY).unwrap().0, 0);
        let (_, end) = priority_band(MIN_PRIORITY).unwrap();
        assert_eq!(end, 1 << 53);
        assert_eq!((end - 1) as f64 as u64, end - 1);
    }

    #[test]
    fn priorities_outside_the_range_are_rejected() {
        assert!(matches!(priority_band(MAX_PRIORITY + 1), Err(QueueError::PriorityOutOfRange(1024))));
        assert!(matches!(priority_band(MIN_PRIORITY - 1), Err(QueueError::PriorityOutOfRange(-1025))));
    }
}
