//! kiln's one AWS error type, which failures are worth retrying, and how long to wait before
//! the next attempt: one policy for publish and bundle.
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

/// Each AWS request's time before it is abandoned and retried (see [`RetryPolicy::default`]).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

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
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }
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
    // S3: two conditional writes of one key at once; the retry meets the winner's condition.
    "ConditionalRequestConflict",
];

/// One failed AWS call, as the service (or the connection) reported it. Callers decide by
/// `code`, never by parsing the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The service's error code (`AccessDenied`, `InvalidSnapshot.NotFound`), when it answered.
    pub code: Option<String>,
    /// The HTTP status, when a response arrived.
    pub status: Option<u16>,
    pub message: String,
    /// Throttling, 5xx, timeouts and dropped connections are worth another attempt.
    pub retryable: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.code, self.status) {
            (Some(c), Some(s)) => write!(f, "{c} (HTTP {s}): {}", self.message),
            (Some(c), None) => write!(f, "{c}: {}", self.message),
            (None, Some(s)) => write!(f, "HTTP {s}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

/// Classifies one SDK error.
pub fn classify<E>(err: &SdkError<E, Response>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let plain = |retryable: bool, message: String| Failure { code: None, status: None, message, retryable };
    match err {
        SdkError::TimeoutError(_) => plain(true, "request timed out".into()),
        SdkError::DispatchFailure(d) if d.is_user() => {
            plain(false, format!("request could not be sent: {}", chain(err)))
        }
        SdkError::DispatchFailure(_) => plain(true, format!("connection failed: {}", chain(err))),
        // A response arrived but could not be read: a connection cut mid-body, usually.
        SdkError::ResponseError(_) => plain(true, format!("unreadable response: {}", chain(err))),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().filter(|c| !c.is_empty()).map(str::to_string);
            let message = match (&code, se.err().message()) {
                (Some(_), m) => m.unwrap_or("").to_string(),
                (None, _) => chain(err),
            };
            let retryable =
                status == 429 || status >= 500 || code.as_deref().is_some_and(|c| RETRYABLE_CODES.contains(&c));
            Failure { code, status: Some(status), message, retryable }
        }
        SdkError::ConstructionFailure(_) => plain(false, format!("request could not be built: {}", chain(err))),
        _ => plain(true, chain(err)),
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

/// A request that failed for good: at once (not retryable) or after every attempt. The one
/// AWS error type of kiln, for publish and bundle alike.
#[derive(Debug, Clone)]
pub struct AwsError {
    /// What was asked (`RegisterImage`, `PutSnapshotBlock 12`).
    pub operation: String,
    pub attempts: u32,
    /// The last attempt's failure.
    pub last: Failure,
}

impl std::error::Error for AwsError {}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.last.retryable {
            write!(f, "{} failed after {} attempts; last error: {}", self.operation, self.attempts, self.last)
        } else {
            write!(f, "{} failed: {} (not retryable)", self.operation, self.last)
        }
    }
}

impl AwsError {
    /// The service's error code of the last attempt, when it answered.
    pub fn code(&self) -> Option<&str> {
        self.last.code.as_deref()
    }
}

/// Full-jitter backoff (AWS Architecture Blog, "Exponential Backoff and Jitter"): a uniform
/// random pause below an exponentially growing ceiling, so parallel workers that failed
/// together do not retry together.
pub fn backoff(policy: &RetryPolicy, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
    use rand::RngExt;
    let ceiling = policy
        .base_delay
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { rng.random_range(0..nanos) })
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts.
pub async fn with_retry<T, E, F, Fut>(policy: &RetryPolicy, operation: &str, mut call: F) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, Response>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut last = Failure { code: None, status: None, message: "no attempt was made".into(), retryable: false };
    for attempt in 0..policy.max_attempts {
        if attempt > 0 {
            let pause = backoff(policy, attempt - 1, &mut rand::rng());
            tokio::time::sleep(pause).await;
        }
        last = match tokio::time::timeout(policy.attempt_timeout, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => classify(&e),
            Err(_) => Failure {
                code: None,
                status: None,
                message: format!("no answer within {} s", policy.attempt_timeout.as_secs()),
                retryable: true,
            },
        };
        if !last.retryable {
            return Err(AwsError { operation: operation.into(), attempts: attempt + 1, last });
        }
    }
    Err(AwsError { operation: operation.into(), attempts: policy.max_attempts, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_below_growing_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = rand::rng();
        for attempt in 0..12 {
            let ceiling = (p.base_delay * (1 << attempt)).min(p.max_delay);
            for _ in 0..100 {
                assert!(backoff(&p, attempt, &mut rng) < ceiling);
            }
        }
    }

    #[test]
    fn messages_say_what_failed_and_how_often() {
        let denied = Failure {
            code: Some("AccessDenied".into()),
            status: Some(403),
            message: "not allowed".into(),
            retryable: false,
        };
        let e = AwsError { operation: "RegisterImage".into(), attempts: 1, last: denied.clone() };
        assert_eq!(e.to_string(), "RegisterImage failed: AccessDenied (HTTP 403): not allowed (not retryable)");
        assert_eq!(e.code(), Some("AccessDenied"));
        let slow = Failure { code: None, status: None, message: "no answer within 60 s".into(), retryable: true };
        let e = AwsError { operation: "PutSnapshotBlock 3".into(), attempts: 10, last: slow };
        assert_eq!(e.to_string(), "PutSnapshotBlock 3 failed after 10 attempts; last error: no answer within 60 s");
        assert_eq!(e.code(), None);
    }
}
