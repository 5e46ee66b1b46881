//! `--fs-rate`: one pace for all of a sandbox's shares, in requests per second and file bytes
//! (read plus written) per second.
//!
//! Each limit is a virtual clock (the generic cell rate algorithm): a request moves the
//! clock on by its cost over the rate, and the worker that served it sleeps while the clock
//! runs more than a burst (a tenth of a second) ahead of real time. The guest's further
//! requests wait in its queue meanwhile, so a guest that floods the share with small files
//! or large writes gets the rate and no more, and nothing is dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lowest rates accepted: a read or write moves up to 1 MiB at once, so a slower byte rate
/// would hold a worker (and the device's reset) for seconds on one request.
pub const MIN_OPS: u64 = 10;
pub const MIN_BYTES: u64 = 1 << 20;

/// How far ahead of real time the clocks may run before a worker waits.
const BURST: Duration = Duration::from_millis(100);

/// A sandbox's fs pace, shared by its shares and their workers.
#[derive(Debug)]
pub struct FsRate {
    ops: Option<u64>,
    bytes: Option<u64>,
    /// When each clock catches up with the work charged so far.
    clocks: Mutex<(Instant, Instant)>,
}

impl FsRate {
    /// A pace of at most `ops` requests and `bytes` bytes per second (`None`: unlimited).
    pub fn new(ops: Option<u64>, bytes: Option<u64>) -> FsRate {
        let now = Instant::now();
        FsRate {
            ops,
            bytes,
            clocks: Mutex::new((now, now)),
        }
    }

    pub fn ops(&self) -> Option<u64> {
        self.ops
    }

    pub fn bytes(&self) -> Option<u64> {
        self.bytes
    }

    /// Charges `ops` requests and `bytes` bytes at `now`; returns how long the caller must
    /// wait before answering.
    pub fn charge_at(&self, ops: u64, bytes: u64, now: Instant) -> Duration {
        let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        let advance = |clock: &mut Instant, rate: Option<u64>, n: u64| -> Duration {
            let Some(rate) = rate.filter(|_| n > 0) else {
                return Duration::ZERO;
            };
            *clock = (*clock).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
            clock.saturating_duration_since(now).saturating_sub(BURST)
        };
        let a = advance(&mut clocks.0, self.ops, ops);
        let b = advance(&mut clocks.1, self.bytes, bytes);
        a.max(b)
    }

    /// Charges now and sleeps as long as the pace says (in the calling fs worker).
    pub fn pace(&self, ops: u64, bytes: u64) {
        let wait = self.charge_at(ops, bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Parses `--fs-rate OPS/BYTES` (either side may be empty): requests per second, then bytes
/// per second with k/m/g suffixes (binary), e.g. `1000/50m`, `/10m`, `200/`.
pub fn parse(s: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let bad = || {
        format!(
            "--fs-rate {s:?}: use OPS/BYTES per second, either may be empty, e.g. 1000/50m, /10m \
             or 200/ (at least {MIN_OPS} requests and 1m)"
        )
    };
    let (ops, bytes) = s.split_once('/').ok_or_else(bad)?;
    let ops = match ops {
        "" => None,
        t => Some(
            t.parse::<u64>()
                .ok()
                .filter(|&v| v >= MIN_OPS)
                .ok_or_else(bad)?,
        ),
    };
    let bytes = match bytes {
        "" => None,
        t => {
            let (num, mult) = match t.as_bytes()[t.len() - 1] {
                b'k' | b'K' => (&t[..t.len() - 1], 1u64 << 10),
                b'm' | b'M' => (&t[..t.len() - 1], 1 << 20),
                b'g' | b'G' => (&t[..t.len() - 1], 1 << 30),
                _ => (t, 1),
            };
            Some(
                num.parse::<u64>()
                    .ok()
                    .and_then(|v| v.checked_mul(mult))
                    .filter(|&v| v >= MIN_BYTES)
                    .ok_or_else(bad)?,
            )
        }
    };
    if ops.is_none() && bytes.is_none() {
        return Err(bad());
    }
    Ok((ops, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulated time: a client that sends its next request as soon as the last one's wait
    /// is over gets the configured rate over 10 s, within 1 %.
    fn served_in_10s(rate: &FsRate, ops: u64, bytes: u64) -> (u64, u64) {
        let t0 = Instant::now();
        let mut now = t0;
        let (mut n_ops, mut n_bytes) = (0, 0);
        while now < t0 + Duration::from_secs(10) {
            now += rate.charge_at(ops, bytes, now);
            n_ops += ops;
            n_bytes += bytes;
        }
        (n_ops, n_bytes)
    }

    #[test]
    fn many_small_requests_get_the_request_rate() {
        let r = FsRate::new(Some(500), None);
        let (ops, _) = served_in_10s(&r, 1, 0);
        // 10 s at 500/s plus the burst's 50.
        assert!((5000..=5100).contains(&ops), "{ops}");
    }

    #[test]
    fn large_writes_get_the_byte_rate() {
        let r = FsRate::new(Some(1000), Some(4 << 20));
        let (_, bytes) = served_in_10s(&r, 1, 1 << 20);
        let want = 40u64 << 20;
        assert!(
            bytes >= want && bytes <= want + (2 << 20),
            "{bytes} for {want}"
        );
    }

    #[test]
    fn an_idle_pace_does_not_bank_time() {
        let r = FsRate::new(Some(100), None);
        let t0 = Instant::now();
        // An hour idle, then a burst: only a tenth of a second's worth passes unwaited.
        let later = t0 + Duration::from_secs(3600);
        let mut free = 0;
        while r.charge_at(1, 0, later).is_zero() {
            free += 1;
        }
        assert_eq!(free, 10);
    }

    #[test]
    fn unlimited_sides_never_wait() {
        let r = FsRate::new(None, Some(MIN_BYTES));
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert!(r.charge_at(1, 0, t0).is_zero());
        }
        assert!(!r.charge_at(0, 1 << 30, t0).is_zero());
    }

    #[test]
    fn parse_accepts_either_side_and_names_the_form() {
        assert_eq!(parse("1000/50m"), Ok((Some(1000), Some(50 << 20))));
        assert_eq!(parse("/10m"), Ok((None, Some(10 << 20))));
        assert_eq!(parse("200/"), Ok((Some(200), None)));
        assert_eq!(parse("20/1g"), Ok((Some(20), Some(1 << 30))));
        for bad in [
            "",
            "/",
            "1000",
            "5/",
            "/512k",
            "x/1m",
            "10/1q",
            "/99999999999g",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("use OPS/BYTES"), "{bad}: {e}");
        }
    }
}
