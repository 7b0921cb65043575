//! Which AWS failures are worth retrying, and how long to wait before the next attempt.
//!
//! The SDK's own retry layer is switched off for the clients kiln builds (see `mod.rs`): kiln
//! retries in one place so that every attempt gets its own timeout, the error that finally
//! surfaces is the real one, and a non-retryable error (AccessDenied, validation) fails at once.

use std::future::Future;
use std::time::Duration;

use aws_sdk_ebs::config::http::HttpResponse as Response;
use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};

/// How hard to try before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt up to `max_delay` (full jitter below it).
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Each attempt is abandoned (and retried) after this long.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts with ceilings 0.2, 0.4, … 6.4 s capped at 10 s: about 25 s of waiting at the
    /// very worst, enough to ride out EBS's per-snapshot throttling bursts (which clear in
    /// seconds) without hiding an outage for minutes. 60 s per attempt is well above the time
    /// a 512 KiB PUT takes on a slow link (~4 s at 1 Mbit/s).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

/// What to do with a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Throttling, 5xx, timeouts, dropped connections: try again after a pause.
    Retry(String),
    /// Anything a retry cannot fix: fail now with this message.
    Fatal(String),
}

/// Error codes AWS services use for throttling and transient server faults (EC2 query API and
/// EBS direct APIs); some arrive with HTTP 400, so the status alone does not tell.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "RequestThrottled",
    "PriorRequestNotComplete",
    "InternalError",
    "InternalFailure",
    "InternalServerException",
    "ServiceUnavailable",
    "Unavailable",
];

/// Classifies one SDK error.
pub fn classify<E>(err: &SdkError<E, Response>) -> Class
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::TimeoutError(_) => Class::Retry("request timed out".into()),
        SdkError::DispatchFailure(d) => {
            if d.is_user() {
                Class::Fatal(format!("request could not be sent: {}", chain(err)))
            } else {
                Class::Retry(format!("connection failed: {}", chain(err)))
            }
        }
        // A response arrived but could not be read: a connection cut mid-body, usually.
        SdkError::ResponseError(_) => Class::Retry(format!("unreadable response: {}", chain(err))),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            let msg = se.err().message().unwrap_or("");
            let what = if code.is_empty() {
                format!("HTTP {status}: {}", chain(err))
            } else {
                format!("{code} (HTTP {status}): {msg}")
            };
            if status == 429 || status >= 500 || RETRYABLE_CODES.contains(&code) {
                Class::Retry(what)
            } else {
                Class::Fatal(what)
            }
        }
        SdkError::ConstructionFailure(_) => Class::Fatal(format!("request could not be built: {}", chain(err))),
        _ => Class::Retry(chain(err)),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A request that failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("{what} failed: {message} (not retryable)")]
    Fatal { what: String, message: String },
    #[error("{what} failed after {attempts} attempts; last error: {message}")]
    Exhausted { what: String, attempts: u32, message: String },
}

impl CallError {
    pub fn message(&self) -> &str {
        match self {
            CallError::Fatal { message, .. } | CallError::Exhausted { message, .. } => message,
        }
    }
}

/// Full-jitter backoff (AWS Architecture Blog, "Exponential Backoff and Jitter"): a uniform
/// random pause below an exponentially growing ceiling, so parallel workers that failed
/// together do not retry together.
pub fn backoff(policy: &RetryPolicy, attempt: u32, rng: &mut SplitMix) -> Duration {
    let ceiling = policy
        .base_delay
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { rng.next() % nanos })
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts.
pub async fn with_retry<T, E, F, Fut>(policy: &RetryPolicy, what: &str, mut call: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, Response>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut rng = SplitMix::from_entropy(what);
    let mut last = String::new();
    for attempt in 0..policy.max_attempts {
        if attempt > 0 {
            tokio::time::sleep(backoff(policy, attempt - 1, &mut rng)).await;
        }
        match tokio::time::timeout(policy.attempt_timeout, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => match classify(&e) {
                Class::Fatal(message) => return Err(CallError::Fatal { what: what.into(), message }),
                Class::Retry(m) => last = m,
            },
            Err(_) => last = format!("no answer within {} s", policy.attempt_timeout.as_secs()),
        }
    }
    Err(CallError::Exhausted { what: what.into(), attempts: policy.max_attempts, message: last })
}

/// A tiny PRNG for jitter: quality does not matter, independence between workers does.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    /// Seeded from the clock and the call's name; jitter is the one place kiln wants variation.
    fn from_entropy(what: &str) -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let mut h = t as u64;
        for b in what.bytes() {
            h = h.rotate_left(5) ^ u64::from(b);
        }
        SplitMix(h)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_below_growing_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = SplitMix::new(7);
        for attempt in 0..12 {
            let ceiling = (p.base_delay * (1 << attempt)).min(p.max_delay);
            for _ in 0..100 {
                assert!(backoff(&p, attempt, &mut rng) < ceiling);
            }
        }
    }
}
