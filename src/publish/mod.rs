//! Publishing a built image as an EBS snapshot and an EBS-backed AMI, with no build instance.
//!
//! Three parts, in the order a publish runs them: [`discover`] finds out, changing nothing, what
//! the publish starts from and what already exists (an AMI with the same name and image
//! SHA-256, a completed snapshot of the same image, an interrupted upload, the parent
//! snapshot) and makes the [`Plan`], whose block list is the pure function in [`blocks`];
//! [`run`] carries it out: the snapshot with the EBS direct APIs ([`ebs`]), the AMI, its
//! shares and copies ([`ami`]), the publish record ([`record`]) and what the next publish of
//! the same image name builds on ([`history`]).
//! Retries and the AWS error type live in one place ([`crate::aws::retry`]). This module,
//! `bundle::upload` and `crate::aws` are the only code that knows the AWS SDK and tokio; the
//! entry points are synchronous.

pub mod ami;
pub mod blocks;
mod discover;
pub mod ebs;
pub mod history;
pub mod packer;
pub mod promote;
pub mod prune;
pub mod record;
mod run;
pub mod ssm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::aws::Endpoint;
use crate::aws::{AwsError, RetryPolicy};
use crate::manifest::ManifestError;
use crate::progress::Progress;
pub use record::{PublishRecord, RegionFailure, RegionImage};

/// PutSnapshotBlock requests in flight. 16 overlaps request latency well beyond what 2 cores can
/// hash and send, and stays far below the per-snapshot request rate at which AWS documents
/// throttling. Measured only against moto, at this value and no other (benches/publish.sh,
/// 2026-12-04: 1,035 blocks of a 4 GiB image in 4.58 s, 2.2x coldsnap; README's table), which
/// answers on localhost: how the value fares against EBS's latency is not measured.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// StartSnapshot `Timeout`: how long (minutes) a pending snapshot accepts blocks, and so the
/// window for `--resume`. AWS allows 10 to 4320; 60 minutes covers an 8 GiB upload at ~2.5 MB/s.
pub const DEFAULT_SNAPSHOT_TIMEOUT_MINUTES: i32 = 60;

/// How long a region's waits (a snapshot completing, an AMI becoming available, a copy queued
/// at EC2's concurrent-copy limit) may go without EC2 reporting progress: real snapshot
/// completion and cross-region copies take minutes to tens of minutes.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// How long a publish waits for another runner's publish of the same image name (in a shared
/// state) before giving up: about what a publish with cross-region copies takes.
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(30 * 60);

/// 1 GiB: snapshot volume sizes are whole GiB.
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub endpoint_url: Option<String>,
    /// Replaces the recipe's regions; the first is where the snapshot is uploaded.
    pub regions: Vec<String>,
    pub concurrency: usize,
    pub dry_run: bool,
    /// Incremental upload: the previous build's manifest and the snapshot made from it.
    pub parent_manifest: Option<PathBuf>,
    pub parent_snapshot: Option<String>,
    /// Where kiln remembers what it published ([`history`]): the last snapshot of the same
    /// image name becomes the parent, and this publish is remembered. None: nothing is
    /// remembered or looked up.
    pub state_dir: Option<PathBuf>,
    /// A history shared by runners (`--state-url`): read from there, written there (only as
    /// the version read) and to `state_dir`, under a lease on the image name.
    pub state_url: Option<crate::share::ShareUrl>,
    /// How long to wait for another runner's publish of the same image name to finish.
    pub lease_wait: Duration,
    /// Upload every block even when a remembered snapshot could be the parent.
    pub full: bool,
    /// Overwrite SSM parameters that name a newer build of the image.
    pub force: bool,
    /// Continue an interrupted upload from `NAME.publish-state.json`.
    pub resume: bool,
    /// Keep the uploaded snapshot when registration fails (default: delete it).
    pub keep_snapshot_on_failure: bool,
    /// Signs the publish statement added to the image's provenance (`NAME.intoto.jsonl`).
    pub sign_key: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub snapshot_timeout_minutes: i32,
    /// How long to wait for the snapshot to complete and the AMIs to become available.
    pub wait_timeout: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            endpoint_url: None,
            regions: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            dry_run: false,
            parent_manifest: None,
            parent_snapshot: None,
            state_dir: None,
            state_url: None,
            lease_wait: DEFAULT_LEASE_WAIT,
            full: false,
            force: false,
            resume: false,
            keep_snapshot_on_failure: false,
            sign_key: None,
            retry: RetryPolicy::default(),
            snapshot_timeout_minutes: DEFAULT_SNAPSHOT_TIMEOUT_MINUTES,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the provenance signing key")]
    SignKey(#[source] crate::provenance::ProvenanceError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest {path} has no [ami] settings; add an [ami] section to the recipe and rebuild")]
    NoAmiSettings { path: PathBuf },
    #[error("no region to publish to: set `regions` in the recipe's [ami] section or pass --region")]
    NoRegion,
    #[error("cannot publish: {0}")]
    Refused(String),
    #[error("reading image {path}")]
    ReadImage { path: PathBuf, source: std::io::Error },
    #[error("image {path} is {found} bytes but its manifest says {expected}; the image changed since it was built: rebuild it")]
    ImageSize { path: PathBuf, expected: u64, found: u64 },
    #[error("block {index} of {path} has SHA-256 {found}, but the manifest says {expected}: the image changed since it was built; rebuild it")]
    ImageChanged { path: PathBuf, index: u64, expected: String, found: String },
    #[error("parent manifest {path}: {reason}")]
    Parent { path: PathBuf, reason: String },
    #[error("{blocks} blocks is more than the EBS direct APIs can address")]
    TooManyBlocks { blocks: u64 },
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error(transparent)]
    Blocks(#[from] blocks::BlockPlanError),
    #[error("snapshot {snapshot_id} is in state {state}: {message}")]
    SnapshotFailed { snapshot_id: String, state: String, message: String },
    #[error("image {image_id} failed: {reason}")]
    ImageFailed { image_id: String, reason: String },
    #[error("waited {secs} s without progress for {what}; raise --wait-timeout, or run again to go on waiting")]
    Timeout { what: String, secs: u64 },
    #[error("resume state {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error("writing {path}")]
    WriteFile { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Lease(Box<crate::share::state::LeaseError>),
    #[error("the shared state: {0}")]
    Share(Box<crate::share::ShareError>),
    #[error("the shared history {record} changed while this publish ran (another runner took over its lease after it ran out): snapshot {snapshot_id} and its AMIs are published, but not remembered there; the next publish of this name builds on the history as it is")]
    HistoryConflict { record: String, snapshot_id: String },
    #[error("unexpected answer from AWS: {0}")]
    Protocol(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the publish is incomplete; what did get published is in {record}. Run the same command again to finish:\n  {}", problems.join("\n  "))]
    Incomplete { problems: Vec<String>, record: PathBuf },
    #[error("registration failed ({cause}); snapshot {snapshot_id} {cleanup}")]
    RegisterFailed { cause: Box<PublishError>, snapshot_id: String, cleanup: String },
}

/// What a publish would do; printed by `--dry-run`, and computed by every run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub manifest: PathBuf,
    pub image: PathBuf,
    pub ami_name: String,
    pub source_region: String,
    /// Regions that receive a CopyImage of the first region's AMI.
    pub copy_regions: Vec<String>,
    /// Regions that receive their own upload of the same blocks, planned in `direct_uploads`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upload_regions: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub direct_uploads: Vec<Plan>,
    pub volume_gib: i64,
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<String>,
    /// Data blocks in the manifest.
    pub data_blocks: u64,
    /// Blocks this run would send (data blocks, or changed ones, plus zero blocks when needed).
    pub blocks_to_send: u64,
    /// Of those, blocks sent as zeros (encrypted snapshots; blocks zeroed since the parent).
    pub zero_blocks_to_send: u64,
    pub bytes_to_send: u64,
    /// Blocks acknowledged by an interrupted run, which this run skips.
    pub already_acknowledged: u64,
    /// Data blocks the new snapshot takes unchanged from its parent instead of being sent.
    pub blocks_inherited: u64,
    /// Why a remembered parent was not used, and the like.
    pub notes: Vec<String>,
    pub existing: Existing,
    pub api_calls: Vec<String>,
    #[serde(skip)]
    jobs: Vec<blocks::BlockJob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Existing {
    /// region → AMI id with the same name and image SHA-256.
    pub amis: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumable_snapshot_id: Option<String>,
}

/// How long a region's waits (snapshot completion, AMI available, a copy queued at EC2's
/// concurrent-copy limit) may go on: `window` from the start, pushed back to `window` from now
/// each time EC2 reports progress (a new state or percentage), so a slow copy that keeps
/// moving is waited for and a stuck one is not.
pub struct Deadline {
    window: Duration,
    /// When it passes, and the last progress EC2 reported.
    state: std::sync::Mutex<(std::time::Instant, String)>,
}

impl Deadline {
    pub fn new(window: Duration) -> Deadline {
        Deadline { window, state: std::sync::Mutex::new((std::time::Instant::now() + window, String::new())) }
    }
    /// EC2 reported `progress` ("pending 45%"); anything new extends the deadline.
    pub fn saw(&self, progress: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 != progress {
            *s = (std::time::Instant::now() + self.window, progress.to_string());
        }
    }
    /// An error when the deadline has passed.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<(), PublishError> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if std::time::Instant::now() < s.0 {
            return Ok(());
        }
        let last = if s.1.is_empty() { "no progress reported".to_string() } else { format!("last seen: {}", s.1) };
        Err(PublishError::Timeout { what: format!("{} ({last})", what()), secs: self.window.as_secs() })
    }
}

/// The pause between polls of something EC2 is doing: short at first, doubling up to a cap, so
/// a quick answer is seen quickly and a long wait does not flood EC2 with requests.
pub(super) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(super) fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { next: first, cap }
    }
    /// Sleeps before the next poll; an error naming `what` instead if `deadline` has passed.
    pub(super) async fn pause(
        &mut self,
        deadline: &Deadline,
        what: impl FnOnce() -> String,
    ) -> Result<(), PublishError> {
        deadline.check(what)?;
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.cap);
        Ok(())
    }
}

/// An idempotency token (StartSnapshot, CopyImage) from a digest of what the call makes:
/// `kiln-` and 48 hex digits, within the 64 characters both calls allow.
fn client_token(digest: &[u8]) -> String {
    format!("kiln-{}", &hex::encode(digest)[..48])
}

/// Publishes the image a manifest describes. Synchronous: runs its own tokio runtime.
/// With `opts.dry_run` nothing is changed and the record is not written; use [`plan`] then.
pub fn publish(
    manifest_path: &Path,
    opts: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishRecord, PublishError> {
    // A key that cannot sign stops the publish before anything is uploaded.
    let key =
        opts.sign_key.as_deref().map(crate::provenance::SigningKey::load).transpose().map_err(PublishError::SignKey)?;
    let rec = runtime()?.block_on(run::publish_async(manifest_path, opts, progress))?;
    let manifest = crate::manifest::Manifest::load(manifest_path)?;
    crate::provenance::record_publish(manifest_path, &manifest, &rec, key.as_ref()).map_err(|source| {
        PublishError::WriteFile { path: crate::outputs::Outputs::of(manifest_path).provenance(), source }
    })?;
    Ok(rec)
}

/// Computes the plan, looking up (read-only) what already exists in AWS.
pub fn plan(manifest_path: &Path, opts: &PublishOptions) -> Result<Plan, PublishError> {
    runtime()?.block_on(async {
        let ctx = discover::Ctx::load(manifest_path, opts).await?;
        let mut plan = ctx.plan().await?;
        for region in &plan.upload_regions.clone() {
            plan.direct_uploads.push(discover::Ctx::plan_region(manifest_path, opts, region, &ctx).await?.1);
        }
        Ok(plan)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, PublishError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(PublishError::Runtime)
}

/// One region's SDK clients, from one configuration (one credential chain), with the SDK's own
/// retries off: `retry` decides instead.
struct Clients {
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
}

async fn clients(opts: &PublishOptions, region: &str) -> Clients {
    let conf =
        crate::aws::sdk_config(&Endpoint { region: Some(region.into()), endpoint_url: opts.endpoint_url.clone() })
            .await;
    Clients {
        ebs: crate::aws::ebs_client(&conf),
        ec2: crate::aws::ec2_client(&conf),
        ssm: crate::aws::ssm_client(&conf),
    }
}

impl From<crate::share::ShareError> for PublishError {
    fn from(e: crate::share::ShareError) -> Self {
        PublishError::Share(Box::new(e))
    }
}

impl From<crate::share::state::LeaseError> for PublishError {
    fn from(e: crate::share::state::LeaseError) -> Self {
        PublishError::Lease(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_stops_at_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let d = Deadline::new(Duration::from_secs(60));
            let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(3));
            let mut seen = vec![b.next];
            for _ in 0..3 {
                b.pause(&d, || "x".into()).await.unwrap();
                seen.push(b.next);
            }
            let ms = |n| Duration::from_millis(n);
            assert_eq!(seen, [ms(1), ms(2), ms(3), ms(3)]);
            let passed = Deadline::new(Duration::ZERO);
            let e = b.pause(&passed, || "the thing".into()).await.unwrap_err().to_string();
            assert!(e.contains("the thing"), "{e}");
        });
    }

    #[test]
    fn deadline_extends_only_on_new_progress() {
        let d = Deadline::new(Duration::from_millis(300));
        d.saw("pending 10%");
        std::thread::sleep(Duration::from_millis(200));
        // The same report again is no progress: the deadline stays where it was.
        d.saw("pending 10%");
        std::thread::sleep(Duration::from_millis(150));
        let e = d.check(|| "ami-1 to become available".into()).unwrap_err();
        assert!(e.to_string().contains("last seen: pending 10%"), "{e}");

        let d = Deadline::new(Duration::from_millis(300));
        for pct in ["pending 10%", "pending 20%", "pending 30%"] {
            std::thread::sleep(Duration::from_millis(150));
            d.saw(pct);
            d.check(|| "ami-1".into()).expect("progress keeps the wait going");
        }
    }
}
