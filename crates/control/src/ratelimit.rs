//! Fixed-window counters for callers who need no credential (players creating lobbies): per
//! source address and per app. Memory is bounded: expired windows are swept once the map
//! holds [`MAX_KEYS`], and while it is still full new keys are refused (counted as limited).

use std::collections::HashMap;
use std::sync::Mutex;

use lodge_model::Millis;

const MAX_KEYS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Windows {
    counts: Mutex<HashMap<String, (Millis, u32)>>,
}

impl Windows {
    /// Count one event for `key` at `now` in windows of `window_ms`; `Err(retry_after_s)` when
    /// `max` were already counted in the current window.
    pub fn hit(&self, key: &str, now: Millis, window_ms: i64, max: u32) -> Result<(), u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= MAX_KEYS && !counts.contains_key(key) {
            counts.retain(|_, (start, _)| now - *start < window_ms);
            if counts.len() >= MAX_KEYS {
                return Err((window_ms / 1000).max(1) as u64);
            }
        }
        let entry = counts.entry(key.to_string()).or_insert((now, 0));
        if now - entry.0 >= window_ms {
            *entry = (now, 0);
        }
        if entry.1 >= max {
            let retry = (entry.0 + window_ms - now + 999) / 1000;
            return Err(retry.max(1) as u64);
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_window_and_key() {
        let w = Windows::default();
        assert!(w.hit("a", 0, 1000, 2).is_ok());
        assert!(w.hit("a", 10, 1000, 2).is_ok());
        assert_eq!(w.hit("a", 500, 1000, 2), Err(1));
        assert!(
            w.hit("b", 500, 1000, 2).is_ok(),
            "another key has its own window"
        );
        assert!(w.hit("a", 1000, 1000, 2).is_ok(), "a new window");
    }
}
