//! Token buckets for `--net-rate`: a sandbox's traffic each way is held to a rate in bytes
//! per second, with a burst of a tenth of a second's worth (at least 64 KiB, so one large
//! segment always fits).
//!
//! The stack asks a bucket how much it may move now, moves at most that (guest frames stay
//! in the card's queue; host data stays in the host socket, so TCP's own flow control
//! slows the sender), then spends what it moved. A frame may overdraw the bucket: the debt
//! is paid before anything else moves, so the long-run rate holds.

use std::time::{Duration, Instant};

/// Smallest burst: one TSO segment at the largest MTU.
const MIN_BURST: f64 = 65536.0;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// May be negative (an overdraft).
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `rate` bytes per second (at least 1), full.
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 10.0).max(MIN_BURST);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Bytes that may move now (0 while in debt).
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        if self.tokens <= 0.0 {
            0
        } else {
            self.tokens as usize
        }
    }

    /// Records `n` bytes moved (possibly more than were available).
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until a useful amount (an eighth of the burst) is available again.
    pub fn wait(&self) -> Duration {
        let want = self.burst / 8.0 - self.tokens;
        if want <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(want / self.rate).max(Duration::from_micros(100))
        }
    }
}

/// A direction's limit as the stack's loops use it: `None` is no limit.
pub trait Limit {
    /// Shaping (TCP, frames): bytes that may move now (`usize::MAX` without a limit), or
    /// `None` when the bucket is empty, which marks the stack `throttled` so it sleeps until
    /// the bucket refills.
    fn allowance(&mut self, throttled: &mut bool) -> Option<usize>;
    /// Policing (UDP): whether `n` bytes may pass now, spending them if so (over the rate,
    /// a datagram is dropped).
    fn police(&mut self, n: usize) -> bool;
    /// Records `n` bytes moved.
    fn spend(&mut self, n: usize);
}

impl Limit for Option<TokenBucket> {
    fn allowance(&mut self, throttled: &mut bool) -> Option<usize> {
        match self {
            None => Some(usize::MAX),
            Some(b) => match b.available(Instant::now()) {
                0 => {
                    *throttled = true;
                    None
                }
                n => Some(n),
            },
        }
    }

    fn police(&mut self, n: usize) -> bool {
        let Some(b) = self else { return true };
        if b.available(Instant::now()) == 0 {
            return false;
        }
        b.spend(n);
        true
    }

    fn spend(&mut self, n: usize) {
        if let Some(b) = self {
            b.spend(n);
        }
    }
}

/// Parses `--net-rate [IN]/[OUT]` (or one value for both): sizes in bytes per second, with
/// k/m/g suffixes (binary) and an optional `/s`-free form: `10m/1m`, `/512k`, `2m`.
pub fn parse_rates(s: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let bad = || {
        format!("--net-rate {s:?}: use [IN]/[OUT] in bytes per second, e.g. 10m/1m, /512k or 2m (both ways)")
    };
    let size = |t: &str| -> Result<Option<u64>, String> {
        if t.is_empty() {
            return Ok(None);
        }
        let (num, mult) = match t.as_bytes()[t.len() - 1] {
            b'k' | b'K' => (&t[..t.len() - 1], 1u64 << 10),
            b'm' | b'M' => (&t[..t.len() - 1], 1 << 20),
            b'g' | b'G' => (&t[..t.len() - 1], 1 << 30),
            _ => (t, 1),
        };
        let v = num
            .parse::<u64>()
            .ok()
            .and_then(|v| v.checked_mul(mult))
            .filter(|&v| v >= 1024)
            .ok_or_else(bad)?;
        Ok(Some(v))
    };
    match s.split_once('/') {
        Some((a, b)) => {
            let r = (size(a)?, size(b)?);
            if r == (None, None) {
                return Err(bad());
            }
            Ok(r)
        }
        None => {
            let v = size(s)?.ok_or_else(bad)?;
            Ok((Some(v), Some(v)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_rate_over_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        // Move as much as allowed every millisecond for 10 s of simulated time, in 1500-byte
        // frames (overdrawing by at most one frame).
        let mut moved = 0usize;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            while b.available(now) > 0 {
                b.spend(1500);
                moved += 1500;
            }
        }
        let expect = 10.0 * (1u64 << 20) as f64 + 65536.0 * 1.6;
        let err = (moved as f64 - expect).abs() / expect;
        assert!(err < 0.02, "moved {moved}, expected about {expect}");
    }

    #[test]
    fn the_burst_is_bounded_and_debt_is_paid_first() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10 << 20, t0);
        // Idle for a minute: no more than the burst (a tenth of a second) is saved up.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.available(later), 1 << 20);
        b.spend(3 << 20);
        assert_eq!(b.available(later), 0);
        assert!(b.wait() >= Duration::from_millis(200));
        assert_eq!(b.available(later + Duration::from_millis(150)), 0);
        assert!(b.available(later + Duration::from_millis(260)) > 0);
    }

    #[test]
    fn small_rates_still_pass_a_large_segment() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(4096, t0);
        assert_eq!(b.available(t0), 65536);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rates("10m/1m"), Ok((Some(10 << 20), Some(1 << 20))));
        assert_eq!(parse_rates("/512k"), Ok((None, Some(512 << 10))));
        assert_eq!(parse_rates("2m/"), Ok((Some(2 << 20), None)));
        assert_eq!(parse_rates("2m"), Ok((Some(2 << 20), Some(2 << 20))));
        for bad in ["", "/", "fast", "1/1", "10x/1m", "-5m", "1m/2m/3m"] {
            assert!(parse_rates(bad).is_err(), "{bad}");
        }
    }
}
