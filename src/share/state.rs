//! Publish history shared by runners: the record of the last publish of an image name, replaced
//! only as the version read (`If-Match`), and a lease that one publish of the name holds at a
//! time (`If-None-Match: *`), renewed while it runs, so a killed runner's lease runs out.
//!
//! With the lease, two runners publishing one name take turns: the second waits, then finds the
//! first one's snapshot as its parent (or its AMI, when the image is the same) — never two
//! children of one parent, never a lost history update. The conditional write of the record is
//! the second line: a publish whose lease was taken from it (it stalled past the lease's
//! lifetime) cannot overwrite what the newer holder wrote.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Condition, ShareError, Store};
use crate::progress::Progress;

/// How long a lease lasts without renewal: a killed runner holds up the others this long.
pub const LEASE_TTL: Duration = Duration::from_secs(10 * 60);
/// How often the holder renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(60);
/// How often a waiting runner looks at the lease again.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// A lease's requests give up well within its lifetime: 3 attempts of 20 s at the most.
const LEASE_POLICY: crate::aws::RetryPolicy = crate::aws::RetryPolicy {
    max_attempts: 3,
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(2),
    attempt_timeout: Duration::from_secs(20),
};

/// What the lease object says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseBody {
    /// Host name and process id of the publish that holds it.
    pub holder: String,
    /// Unix seconds.
    pub taken_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("another publish of this image name is in progress: {holder} holds {lease} since {since}; waited {waited} s. Let it finish and run again (the next publish builds on it), or raise --lease-wait. If that runner died, its lease runs out at {expires}")]
    Busy { holder: String, lease: String, since: String, expires: String, waited: u64 },
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// A held lease; renewed in the background until released.
pub struct Lease {
    store: Store,
    name: String,
    holder: String,
    taken_at: i64,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    /// When the lease was last taken or renewed.
    renewed: Arc<Mutex<std::time::Instant>>,
    renewer: tokio::task::JoinHandle<()>,
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{} pid {}", host.trim(), std::process::id())
}

fn body(holder: &str, taken_at: i64) -> Vec<u8> {
    let b =
        LeaseBody { holder: holder.to_string(), taken_at, expires_at: crate::aws::now() + LEASE_TTL.as_secs() as i64 };
    serde_json::to_vec(&b).unwrap_or_default()
}

impl Lease {
    /// Takes the lease `name`, waiting up to `wait` while another publish holds it (saying so
    /// once), and taking over a lease that ran out.
    pub async fn acquire(
        store: &Store,
        name: &str,
        wait: Duration,
        progress: &dyn Progress,
    ) -> Result<Lease, LeaseError> {
        let store = &store.with_policy(LEASE_POLICY);
        let me = holder();
        let started = std::time::Instant::now();
        let mut said = false;
        loop {
            let taken_at = crate::aws::now();
            if let Some(etag) = store.put(name, body(&me, taken_at), Condition::Absent).await? {
                return Ok(Lease::held(store, name, etag, me, taken_at));
            }
            let Some(current) = store.get(name).await? else { continue };
            let theirs: Option<LeaseBody> = serde_json::from_slice(&current.bytes).ok();
            let expired = theirs.as_ref().is_none_or(|l| l.expires_at < crate::aws::now());
            if expired {
                if let Some(etag) = store.put(name, body(&me, taken_at), Condition::Matches(current.etag)).await? {
                    let who = theirs.map_or_else(|| "an unreadable lease".to_string(), |l| l.holder);
                    progress.note(&format!("took over the lease {} that {who} let run out", store.url().show(name)));
                    return Ok(Lease::held(store, name, etag, me, taken_at));
                }
                continue;
            }
            let l = theirs.unwrap_or(LeaseBody { holder: String::new(), taken_at: 0, expires_at: 0 });
            let waited = started.elapsed();
            if waited >= wait {
                return Err(LeaseError::Busy {
                    holder: l.holder,
                    lease: store.url().show(name),
                    since: rfc3339(l.taken_at),
                    expires: rfc3339(l.expires_at),
                    waited: waited.as_secs(),
                });
            }
            if !said {
                progress.note(&format!(
                    "waiting for another publish of this image name: {} holds {} since {}",
                    l.holder,
                    store.url().show(name),
                    rfc3339(l.taken_at)
                ));
                said = true;
            }
            tokio::time::sleep(POLL_EVERY.min(wait - waited)).await;
        }
    }

    fn held(store: &Store, name: &str, etag: String, me: String, taken_at: i64) -> Lease {
        let etag = Arc::new(Mutex::new(etag));
        let lost = Arc::new(AtomicBool::new(false));
        let renewed = Arc::new(Mutex::new(std::time::Instant::now()));
        let (s, n, e, l, r, who) =
            (store.clone(), name.to_string(), etag.clone(), lost.clone(), renewed.clone(), me.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let current = e.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match s.put(&n, body(&who, taken_at), Condition::Matches(current)).await {
                    Ok(Some(new)) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = new;
                        *r.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
                    }
                    // Taken over: this publish stalled past the lease's lifetime.
                    Ok(None) => {
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // Tried again a minute on; `lost` counts the time since the last renewal.
                    Err(_) => {}
                }
            }
        });
        Lease { store: store.clone(), name: name.to_string(), holder: me, taken_at, etag, lost, renewed, renewer }
    }

    /// Whether this publish may no longer count on the lease: another took it over, or it
    /// has gone unrenewed so long that another may have.
    pub fn lost(&self) -> bool {
        let since = self.renewed.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        self.lost.load(Ordering::SeqCst) || since + 2 * RENEW_EVERY > LEASE_TTL
    }

    /// Gives the lease up (only while it is still this publish's).
    pub async fn release(self) -> Result<(), ShareError> {
        let Lease { store, name, holder, taken_at, etag, lost, renewer, .. } = self;
        renewer.abort();
        let _ = renewer.await;
        if lost.load(Ordering::SeqCst) {
            return Ok(());
        }
        let etag = etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if store.delete(&name, Some(&etag)).await? {
            return Ok(());
        }
        // A renewal cut short by the abort may have landed with an ETag never seen here: the
        // lease is still ours if it names this holder and this taking.
        if let Some(now) = store.get(&name).await? {
            let ours = serde_json::from_slice::<LeaseBody>(&now.bytes)
                .is_ok_and(|l| l.holder == holder && l.taken_at == taken_at);
            if ours {
                store.delete(&name, Some(&now.etag)).await?;
            }
        }
        Ok(())
    }
}

/// A record read from the shared state: its bytes (None when there is none) and the ETag of
/// the version read, which the next write must match.
#[derive(Debug, Clone, Default)]
pub struct ReadRecord {
    pub bytes: Option<Vec<u8>>,
    pub etag: Option<String>,
}

/// Reads the record `name`.
pub async fn read(store: &Store, name: &str) -> Result<ReadRecord, ShareError> {
    Ok(match store.get(name).await? {
        Some(v) => ReadRecord { bytes: Some(v.bytes), etag: Some(v.etag) },
        None => ReadRecord::default(),
    })
}

/// Replaces the record `name` if it is still the version `read` saw; false when another
/// runner wrote it in between.
pub async fn write(store: &Store, name: &str, bytes: Vec<u8>, read: &ReadRecord) -> Result<bool, ShareError> {
    let cond = match &read.etag {
        Some(e) => Condition::Matches(e.clone()),
        None => Condition::Absent,
    };
    Ok(store.put(name, bytes, cond).await?.is_some())
}
