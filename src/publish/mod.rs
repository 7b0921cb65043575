//! Publishing a built image as an EBS snapshot and an EBS-backed AMI, with no build instance.
//!
//! `publish` is a flat list of steps: load the manifest, plan which blocks to send, reuse what
//! already exists (an AMI with the same name and image SHA-256, or a completed snapshot of the
//! same image), upload the snapshot with the EBS direct APIs ([`ebs`]), register the AMI,
//! share it, copy it to the other regions ([`ami`]), and write the publish record ([`record`]).
//! Retries and the AWS error type live in one place ([`crate::aws::retry`]). This module,
//! `bundle::upload` and `crate::aws` are the only code that knows the AWS SDK and tokio; the
//! entry points are synchronous.

pub mod ami;
pub mod blocks;
pub mod ebs;
pub mod record;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::aws::Endpoint;
use crate::aws::{AwsError, RetryPolicy};
use crate::manifest::{AmiSettings, Manifest, ManifestError, EBS_BLOCK_SIZE};
use crate::progress::Progress;
pub use record::{PublishRecord, RegionImage};

/// PutSnapshotBlock requests in flight. Not tuned by measurement yet (benches/publish.sh has not
/// been run): 16 overlaps request latency well beyond what 2 cores can hash and send, and stays
/// far below the per-snapshot request rate at which AWS documents throttling.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// StartSnapshot `Timeout`: how long (minutes) a pending snapshot accepts blocks, and so the
/// window for `--resume`. AWS allows 10 to 4320; 60 minutes covers an 8 GiB upload at ~2.5 MB/s.
pub const DEFAULT_SNAPSHOT_TIMEOUT_MINUTES: i32 = 60;

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
    /// Continue an interrupted upload from `NAME.publish-state.json`.
    pub resume: bool,
    /// Keep the uploaded snapshot when registration fails (default: delete it).
    pub keep_snapshot_on_failure: bool,
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
            resume: false,
            keep_snapshot_on_failure: false,
            retry: RetryPolicy::default(),
            snapshot_timeout_minutes: DEFAULT_SNAPSHOT_TIMEOUT_MINUTES,
            // Real snapshot completion and cross-region copies take minutes to tens of minutes.
            wait_timeout: Duration::from_secs(60 * 60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
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
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("resume state {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error("writing {path}")]
    WriteFile { path: PathBuf, source: std::io::Error },
    #[error("unexpected answer from AWS: {0}")]
    Protocol(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
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
    pub copy_regions: Vec<String>,
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
    pub existing: Existing,
    pub api_calls: Vec<String>,
    #[serde(skip)]
    jobs: Vec<ebs::BlockJob>,
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

/// Publishes the image a manifest describes. Synchronous: runs its own tokio runtime.
/// With `opts.dry_run` nothing is changed and the record is not written; use [`plan`] then.
pub fn publish(
    manifest_path: &Path,
    opts: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishRecord, PublishError> {
    runtime()?.block_on(publish_async(manifest_path, opts, progress))
}

/// Computes the plan, looking up (read-only) what already exists in AWS.
pub fn plan(manifest_path: &Path, opts: &PublishOptions) -> Result<Plan, PublishError> {
    runtime()?.block_on(async {
        let ctx = Ctx::load(manifest_path, opts).await?;
        ctx.plan().await
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, PublishError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(PublishError::Runtime)
}

struct Ctx {
    manifest_path: PathBuf,
    manifest: Manifest,
    settings: AmiSettings,
    opts: PublishOptions,
    regions: Vec<String>,
    parent: Option<(Manifest, String)>,
    name: String,
    tags: Vec<(String, String)>,
}

/// SDK clients for one region, with the SDK's own retries off: `retry` decides instead.
async fn clients(opts: &PublishOptions, region: &str) -> (aws_sdk_ebs::Client, aws_sdk_ec2::Client) {
    let conf =
        crate::aws::sdk_config(&Endpoint { region: Some(region.into()), endpoint_url: opts.endpoint_url.clone() })
            .await;
    let ebs = aws_sdk_ebs::config::Builder::from(&conf)
        .retry_config(aws_sdk_ebs::config::retry::RetryConfig::disabled())
        .build();
    let ec2 = aws_sdk_ec2::config::Builder::from(&conf)
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    (aws_sdk_ebs::Client::from_conf(ebs), aws_sdk_ec2::Client::from_conf(ec2))
}

impl Ctx {
    async fn load(manifest_path: &Path, opts: &PublishOptions) -> Result<Ctx, PublishError> {
        let manifest = Manifest::load(manifest_path)?;
        // Loading judged the settings by `kiln check`'s rules: a manifest EC2 would refuse
        // never gets this far.
        let settings =
            manifest.ami.clone().ok_or_else(|| PublishError::NoAmiSettings { path: manifest_path.into() })?;
        let regions = if opts.regions.is_empty() { settings.regions.clone() } else { opts.regions.clone() };
        if regions.is_empty() {
            return Err(PublishError::NoRegion);
        }
        let parent = match (&opts.parent_manifest, &opts.parent_snapshot) {
            (Some(p), Some(s)) => {
                let pm = Manifest::load(p)?;
                if pm.blocks.block_size != EBS_BLOCK_SIZE {
                    return Err(PublishError::Parent { path: p.clone(), reason: format!("block size {} is not {EBS_BLOCK_SIZE}", pm.blocks.block_size) });
                }
                Some((pm, s.clone()))
            }
            (None, None) => None,
            (Some(p), None) => {
                return Err(PublishError::Parent { path: p.clone(), reason: "--parent-manifest needs --parent-snapshot snap-… (the snapshot published from it)".into() })
            }
            (None, Some(_)) => {
                return Err(PublishError::Refused("--parent-snapshot needs --parent-manifest: kiln must know the parent's blocks to send only the differences".into()))
            }
        };
        let name = ami::expand_name(&settings.name, &manifest);
        let tags = ami::all_tags(&settings, &manifest);
        Ok(Ctx {
            manifest_path: manifest_path.into(),
            manifest,
            settings,
            opts: opts.clone(),
            regions,
            parent,
            name,
            tags,
        })
    }

    fn image_path(&self) -> PathBuf {
        self.manifest.image_path(&self.manifest_path)
    }

    /// Which blocks to send, and where their bytes come from ([`blocks`]).
    fn jobs(&self) -> Result<Vec<ebs::BlockJob>, PublishError> {
        let target = match &self.parent {
            Some((pm, _)) => blocks::Target::Child { parent: &pm.blocks },
            None if self.settings.encrypted => blocks::Target::Encrypted,
            None => blocks::Target::New,
        };
        Ok(blocks::blocks_to_send(&self.manifest.blocks, self.manifest.image.size_bytes, target)?)
    }

    fn volume_gib(&self) -> i64 {
        // At least 1 GiB: EBS has no smaller volume.
        self.manifest.image.size_bytes.div_ceil(GIB).max(1) as i64
    }

    /// Derived from everything that determines the snapshot's content, so a retried
    /// StartSnapshot returns the same snapshot instead of a second one.
    fn client_token(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.manifest.image.sha256.as_bytes());
        h.update([0]);
        h.update(self.parent.as_ref().map(|p| p.1.as_str()).unwrap_or("").as_bytes());
        h.update([0]);
        h.update(if self.settings.encrypted { b"enc" } else { b"raw" });
        h.update(self.settings.kms_key_arn.as_deref().unwrap_or("").as_bytes());
        // ClientToken allows 64 characters.
        format!("kiln-{}", &hex::encode(h.finalize())[..48])
    }

    fn resume_state(&self) -> Result<Option<record::UploadState>, PublishError> {
        let path = record::state_path(&self.manifest_path);
        let st = record::read_state(&path)
            .map_err(|e| PublishError::Resume { path: path.clone(), reason: e.to_string() })?;
        match st {
            Some(st) if st.image_sha256 != self.manifest.image.sha256 => Err(PublishError::Resume {
                path,
                reason: format!(
                    "it belongs to image {}, not {}; delete it to start over",
                    st.image_sha256, self.manifest.image.sha256
                ),
            }),
            Some(st) if st.parent_snapshot_id != self.parent.as_ref().map(|p| p.1.clone()) => {
                Err(PublishError::Resume {
                    path,
                    reason:
                        "it was started with a different parent snapshot; pass the same --parent-snapshot, or delete it"
                            .into(),
                })
            }
            other => Ok(other),
        }
    }

    async fn plan(&self) -> Result<Plan, PublishError> {
        let jobs = self.jobs()?;
        let (_, ec2) = clients(&self.opts, &self.regions[0]).await;
        let mut existing = Existing::default();
        for region in &self.regions {
            let (_, ec2r) = clients(&self.opts, region).await;
            if let Some((id, _)) =
                ami::find_existing(&ec2r, &self.opts.retry, &self.name, &self.manifest.image.sha256).await?
            {
                existing.amis.insert(region.clone(), id);
            }
        }
        let resume = self.resume_state()?;
        existing.resumable_snapshot_id = resume.as_ref().map(|s| s.snapshot_id.clone());
        // The snapshot of an interrupted upload is never reused as if complete (a stand-in
        // may already report it `completed`); `--resume` finishes it instead.
        existing.snapshot_id =
            ami::find_snapshot(&ec2, &self.opts.retry, &self.manifest.image.sha256, self.settings.encrypted)
                .await?
                .filter(|s| Some(s) != existing.resumable_snapshot_id.as_ref());
        let acked: std::collections::BTreeSet<u64> = resume.map(|s| s.acked.into_iter().collect()).unwrap_or_default();
        let already = jobs.iter().filter(|j| acked.contains(&j.index)).count() as u64;
        let zero = jobs.iter().filter(|j| j.source == ebs::Source::Zero).count() as u64;
        let need_upload = !existing.amis.contains_key(&self.regions[0]) && existing.snapshot_id.is_none();
        let to_send = if need_upload { jobs.len() as u64 - already } else { 0 };
        let mut calls = Vec::new();
        if need_upload {
            if existing.resumable_snapshot_id.is_some() {
                calls.push(format!("resume snapshot {}", existing.resumable_snapshot_id.as_deref().unwrap_or("")));
            } else {
                calls.push(format!(
                    "ebs:StartSnapshot VolumeSize={} GiB{}",
                    self.volume_gib(),
                    self.parent.as_ref().map(|p| format!(" ParentSnapshotId={}", p.1)).unwrap_or_default()
                ));
            }
            calls.push(format!("ebs:PutSnapshotBlock ×{to_send} (524288 bytes each, SHA-256 per block)"));
            calls.push(format!("ebs:CompleteSnapshot ChangedBlocksCount={} (LINEAR checksum)", jobs.len()));
            calls.push("ec2:DescribeSnapshots until completed".into());
        }
        if !existing.amis.contains_key(&self.regions[0]) {
            calls.push(format!("ec2:RegisterImage {} in {}", self.name, self.regions[0]));
            calls.push(
                "ec2:ModifyImageAttribute launchPermission + ec2:ModifySnapshotAttribute createVolumePermission".into(),
            );
        }
        for r in &self.regions[1..] {
            if !existing.amis.contains_key(r) {
                calls.push(format!("ec2:CopyImage to {r}, wait until available, CreateTags, share"));
            }
        }
        Ok(Plan {
            manifest: self.manifest_path.clone(),
            image: self.image_path(),
            ami_name: self.name.clone(),
            source_region: self.regions[0].clone(),
            copy_regions: self.regions[1..].to_vec(),
            volume_gib: self.volume_gib(),
            encrypted: self.settings.encrypted,
            parent_snapshot_id: self.parent.as_ref().map(|p| p.1.clone()),
            data_blocks: self.manifest.blocks.data_blocks.len() as u64,
            blocks_to_send: to_send,
            zero_blocks_to_send: if need_upload { zero } else { 0 },
            bytes_to_send: to_send * EBS_BLOCK_SIZE,
            already_acknowledged: already,
            existing,
            api_calls: calls,
            jobs,
        })
    }
}

async fn publish_async(
    manifest_path: &Path,
    opts: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishRecord, PublishError> {
    let ctx = Ctx::load(manifest_path, opts).await?;
    let plan = ctx.plan().await?;
    if opts.dry_run {
        return Err(PublishError::Refused("dry run: use publish::plan()".into()));
    }
    let image_path = ctx.image_path();
    let found = std::fs::metadata(&image_path)
        .map_err(|source| PublishError::ReadImage { path: image_path.clone(), source })?
        .len();
    if found != ctx.manifest.image.size_bytes {
        return Err(PublishError::ImageSize { path: image_path, expected: ctx.manifest.image.size_bytes, found });
    }
    let src = ctx.regions[0].clone();
    let (ebs_c, ec2) = clients(opts, &src).await;
    let policy = opts.retry;

    // 1. The snapshot: reuse, or upload.
    let mut blocks_sent = 0;
    let mut created_snapshot = false;
    let (image_id, snapshot_id, reused) = if let Some(id) = plan.existing.amis.get(&src) {
        progress.note(&format!("{id} in {src} already has this name and image SHA-256; reusing it"));
        let snap = ami::find_existing(&ec2, &policy, &ctx.name, &ctx.manifest.image.sha256)
            .await?
            .and_then(|x| x.1)
            .unwrap_or_default();
        (id.clone(), snap, true)
    } else {
        let snapshot_id = if let Some(s) = &plan.existing.snapshot_id {
            progress.note(&format!("snapshot {s} already holds this image; registering it"));
            s.clone()
        } else {
            // An interrupted upload of this image is resumed whenever its state is found (a
            // re-run after a kill must not start a second snapshot), unless its pending
            // snapshot expired: then the upload starts over.
            let resume = match ctx.resume_state()? {
                Some(st) => match ebs::still_pending(&ec2, &st.snapshot_id, &policy).await? {
                    Ok(()) => Some(st),
                    Err(why) => {
                        progress.note(&format!(
                            "the interrupted upload's snapshot {} cannot be resumed: {why}; starting over",
                            st.snapshot_id
                        ));
                        None
                    }
                },
                None => {
                    if opts.resume {
                        progress.note("nothing to resume; starting a new upload");
                    }
                    None
                }
            };
            let up = ebs::Upload {
                ebs: ebs_c.clone(),
                ec2: ec2.clone(),
                image_path: image_path.clone(),
                image_size_bytes: ctx.manifest.image.size_bytes,
                image_sha256: ctx.manifest.image.sha256.clone(),
                volume_gib: ctx.volume_gib(),
                description: format!("kiln {} image {}", ctx.manifest.name, ctx.manifest.image.sha256),
                tags: ctx.tags.clone(),
                client_token: ctx.client_token(),
                encrypted: ctx.settings.encrypted,
                kms_key_arn: ctx.settings.kms_key_arn.clone(),
                parent_snapshot_id: ctx.parent.as_ref().map(|p| p.1.clone()),
                jobs: plan.jobs.clone(),
                concurrency: opts.concurrency,
                policy,
                snapshot_timeout_minutes: opts.snapshot_timeout_minutes,
                wait_timeout: opts.wait_timeout,
                state_path: record::state_path(manifest_path),
                resume,
                progress,
            };
            let done = up.run().await?;
            blocks_sent = done.blocks_sent;
            created_snapshot = true;
            done.snapshot_id
        };
        // 2. Register; on failure, delete a snapshot this run created unless told to keep it.
        let registered = async {
            let id =
                ami::register(&ec2, &policy, &ctx.settings, &ctx.manifest, &ctx.name, &snapshot_id, &ctx.tags).await?;
            ami::wait_available(&ec2, &policy, &id, opts.wait_timeout, progress).await?;
            Ok::<String, PublishError>(id)
        }
        .await;
        match registered {
            Ok(id) => (id, snapshot_id, false),
            Err(e) => {
                let cleanup = if !created_snapshot || opts.keep_snapshot_on_failure {
                    "was kept".to_string()
                } else {
                    match ami::delete_snapshot(&ec2, &policy, &snapshot_id).await {
                        Ok(()) => "was deleted".into(),
                        Err(d) => format!("could not be deleted ({d}); delete it by hand"),
                    }
                };
                return Err(PublishError::RegisterFailed { cause: Box::new(e), snapshot_id, cleanup });
            }
        }
    };
    if !reused {
        // RegisterImage's TagSpecifications already tag the image; tagging again costs one
        // call and covers endpoints that ignore TagSpecifications, so `find_existing` (which
        // matches on the tag) always finds this AMI on a re-run.
        ami::create_tags(&ec2, &policy, &[image_id.as_str(), snapshot_id.as_str()], &ctx.tags).await?;
    }
    ami::share(&ec2, &policy, &ctx.settings, &image_id, &snapshot_id).await?;
    let mut amis =
        vec![RegionImage { region: src.clone(), image_id: image_id.clone(), snapshot_id: snapshot_id.clone(), reused }];

    // 3. Other regions, in parallel.
    let copies = ctx.regions[1..].iter().map(|region| {
        let ctx = &ctx;
        let image_id = image_id.clone();
        let src = src.clone();
        let existing = plan.existing.amis.get(region).cloned();
        async move {
            let (_, ec2r) = clients(&ctx.opts, region).await;
            let (id, reused) = match existing {
                Some(id) => (id, true),
                None => {
                    let token = format!(
                        "kiln-{}",
                        &hex::encode(Sha256::digest(format!("{image_id}\0{region}\0{}", ctx.name)))[..48]
                    );
                    (
                        ami::copy(
                            &ec2r,
                            &policy,
                            &src,
                            &image_id,
                            &ctx.name,
                            ctx.settings.description.as_deref(),
                            &token,
                        )
                        .await?,
                        false,
                    )
                }
            };
            let snap =
                ami::wait_available(&ec2r, &policy, &id, ctx.opts.wait_timeout, progress).await?.unwrap_or_default();
            let mut ids = vec![id.as_str()];
            if !snap.is_empty() {
                ids.push(&snap);
            }
            ami::create_tags(&ec2r, &policy, &ids, &ctx.tags).await?;
            ami::share(&ec2r, &policy, &ctx.settings, &id, &snap).await?;
            Ok::<RegionImage, PublishError>(RegionImage {
                region: region.clone(),
                image_id: id.clone(),
                snapshot_id: snap,
                reused,
            })
        }
    });
    for r in join_all(copies).await {
        amis.push(r?);
    }

    let rec = PublishRecord {
        name: ctx.manifest.name.clone(),
        image_sha256: ctx.manifest.image.sha256.clone(),
        recipe_sha256: ctx.manifest.recipe.sha256.clone(),
        source_region: src,
        snapshot_id,
        parent_snapshot_id: ctx.parent.as_ref().map(|p| p.1.clone()),
        blocks_sent,
        bytes_sent: blocks_sent * EBS_BLOCK_SIZE,
        ami_name: ctx.name.clone(),
        amis,
    };
    let path = record::record_path(manifest_path);
    record::write_json_atomic(&path, &rec).map_err(|source| PublishError::WriteFile { path, source })?;
    Ok(rec)
}

/// Runs futures concurrently on this task, results in input order (no extra dependency).
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}
