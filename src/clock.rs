//! The loop clock: `loop.time()` must equal `time.monotonic()` to the bit, because
//! libraries (aiohttp among them) compare the two.
//!
//! CPython reads `CLOCK_MONOTONIC`, turns it into integer nanoseconds and divides by 1e9;
//! doing the same arithmetic here gives the identical `float`.

/// Seconds on the monotonic clock, computed exactly as `time.monotonic()` computes them.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ns = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
    if ns % 1_000_000_000 == 0 {
        (ns / 1_000_000_000) as f64
    } else {
        ns as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let a = monotonic();
        let b = monotonic();
        assert!(b >= a);
    }
}
