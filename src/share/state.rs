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
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
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
    let b = LeaseBody { holder: holder.to_string(), taken_at, expires_at: now() + LEASE_TTL.as_secs() as i64 };
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
        let me = holder();
        let started = std::time::Instant::now();
        let mut said = false;
        loop {
            let taken_at = now();
            if let Some(etag) = store.put(name, body(&me, taken_at), Condition::Absent).await? {
                return Ok(Lease::held(store, name, etag, me, taken_at));
            }
            let Some(current) = store.get(name).await? else { continue };
            let theirs: Option<LeaseBody> = serde_json::from_slice(&current.bytes).ok();
            let expired = theirs.as_ref().is_none_or(|l| l.expires_at < now());
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
        let (s, n, e, l) = (store.clone(), name.to_string(), etag.clone(), lost.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let current = e.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match s.put(&n, body(&me, taken_at), Condition::Matches(current)).await {
                    Ok(Some(new)) => *e.lock().unwrap_or_else(|p| p.into_inner()) = new,
                    // Taken over: this publish stalled past the lease's lifetime.
                    Ok(None) => {
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A failed renewal is tried again; the lease lasts ten renewals.
                    Err(_) => {}
                }
            }
        });
        Lease { store: store.clone(), name: name.to_string(), etag, lost, renewer }
    }

    /// Whether another publish took the lease over (this one outlived it).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease up (only the version this publish holds).
    pub async fn release(self) -> Result<(), ShareError> {
        self.renewer.abort();
        let etag = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !self.lost() {
            self.store.delete(&self.name, Some(&etag)).await?;
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
