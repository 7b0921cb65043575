//! Snapshot upload with the EBS direct APIs: StartSnapshot, PutSnapshotBlock for exactly the
//! blocks the plan lists, CompleteSnapshot with the LINEAR aggregate checksum, then a wait for
//! `completed` through EC2 DescribeSnapshots.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::blocks::{BlockJob, Source};
use super::record::{self, UploadState};
use super::PublishError;
use crate::aws::{with_retry, RetryPolicy};
use crate::manifest::EBS_BLOCK_SIZE;
use crate::progress::{Progress, Unit};

/// `EBS_BLOCK_SIZE` as the SDK's integer type; 524288 fits easily.
const BLOCK_LEN_I32: i32 = EBS_BLOCK_SIZE as i32;

/// CompleteSnapshot's LINEAR checksum: SHA-256 over the concatenated raw 32-byte digests of
/// every written block in ascending block-index order, base64.
pub fn linear_checksum(jobs: &[BlockJob]) -> String {
    let mut sorted: Vec<&BlockJob> = jobs.iter().collect();
    sorted.sort_by_key(|j| j.index);
    let mut h = Sha256::new();
    for j in sorted {
        h.update(j.digest());
    }
    b64(&h.finalize())
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Everything one upload needs.
pub struct Upload<'a> {
    pub ebs: aws_sdk_ebs::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub image_path: PathBuf,
    pub image_size_bytes: u64,
    pub image_sha256: String,
    pub volume_gib: i64,
    pub description: String,
    pub tags: Vec<(String, String)>,
    pub client_token: String,
    pub encrypted: bool,
    pub kms_key_arn: Option<String>,
    pub parent_snapshot_id: Option<String>,
    pub jobs: Vec<BlockJob>,
    pub concurrency: usize,
    pub policy: RetryPolicy,
    /// StartSnapshot's Timeout: minutes the snapshot stays open for writes (and for `--resume`).
    pub snapshot_timeout_minutes: i32,
    pub deadline: &'a super::Deadline,
    pub state_path: PathBuf,
    /// Acknowledged blocks of an earlier, interrupted run of this snapshot.
    pub resume: Option<UploadState>,
    pub progress: &'a dyn Progress,
}

pub struct Uploaded {
    pub snapshot_id: String,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
}

impl Upload<'_> {
    pub async fn run(self) -> Result<Uploaded, PublishError> {
        let (snapshot_id, acked) = match &self.resume {
            Some(st) => {
                self.progress.note(&format!(
                    "resuming snapshot {} ({} blocks already acknowledged)",
                    st.snapshot_id,
                    st.acked.len()
                ));
                (st.snapshot_id.clone(), st.acked.iter().copied().collect::<BTreeSet<u64>>())
            }
            None => (self.start().await?, BTreeSet::new()),
        };
        let state = Arc::new(Mutex::new(UploadState {
            image_sha256: self.image_sha256.clone(),
            snapshot_id: snapshot_id.clone(),
            parent_snapshot_id: self.parent_snapshot_id.clone(),
            acked: acked.iter().copied().collect(),
        }));
        self.save_state(&state)?;

        let todo = super::blocks::still_to_send(&self.jobs, &acked);
        let total = self.jobs.len() as u64;
        let sent = self.put_blocks(&snapshot_id, todo, total, acked.len() as u64, &state).await;
        // Whatever happened, keep what EBS acknowledged so `--resume` need not send it again.
        self.save_state(&state)?;
        let sent = sent?;

        let checksum = linear_checksum(&self.jobs);
        let changed = i32::try_from(self.jobs.len()).map_err(|_| PublishError::TooManyBlocks { blocks: total })?;
        let out = with_retry(&self.policy, "CompleteSnapshot", || {
            self.ebs
                .complete_snapshot()
                .snapshot_id(&snapshot_id)
                .changed_blocks_count(changed)
                .checksum(&checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
                .send()
        })
        .await?;
        let status = out.status().map(|s| s.as_str().to_string()).unwrap_or_default();
        if status == "error" {
            return Err(PublishError::SnapshotFailed {
                snapshot_id,
                state: status,
                message: "CompleteSnapshot".into(),
            });
        }
        let _ = std::fs::remove_file(&self.state_path);
        let _ = std::fs::remove_file(record::journal_path(&self.state_path));
        wait_completed(&self.ec2, &snapshot_id, &self.policy, self.deadline, self.progress).await?;
        Ok(Uploaded { snapshot_id, blocks_sent: sent, bytes_sent: sent * EBS_BLOCK_SIZE })
    }

    async fn start(&self) -> Result<String, PublishError> {
        let tags: Vec<Tag> = self.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
        let out = with_retry(&self.policy, "StartSnapshot", || {
            let mut req = self
                .ebs
                .start_snapshot()
                .volume_size(self.volume_gib)
                .timeout(self.snapshot_timeout_minutes)
                .description(&self.description)
                .set_tags(Some(tags.clone()))
                .client_token(&self.client_token);
            if self.encrypted {
                req = req.encrypted(true).set_kms_key_arn(self.kms_key_arn.clone());
            }
            if let Some(p) = &self.parent_snapshot_id {
                req = req.parent_snapshot_id(p);
            }
            req.send()
        })
        .await?;
        let id = out.snapshot_id().unwrap_or_default().to_string();
        if id.is_empty() {
            return Err(PublishError::Protocol("StartSnapshot returned no snapshot id".into()));
        }
        // kiln always sends 524288-byte blocks: that is the only size PutSnapshotBlock accepts
        // (DataLength must be 524288), and the manifest's digests are over that size. A
        // different reported BlockSize is a service quirk (moto reports 512), not a reason to
        // re-chunk; warn so it is visible, and go on.
        if let Some(bs) = out.block_size() {
            if i64::from(bs) != EBS_BLOCK_SIZE as i64 {
                self.progress.note(&format!(
                    "warning: StartSnapshot reported BlockSize {bs}; EBS direct APIs use {EBS_BLOCK_SIZE}, sending {EBS_BLOCK_SIZE}-byte blocks"
                ));
            }
        }
        self.progress.note(&format!("started snapshot {id} ({} GiB)", self.volume_gib));
        Ok(id)
    }

    fn save_state(&self, state: &Arc<Mutex<UploadState>>) -> Result<(), PublishError> {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        st.acked.sort_unstable();
        st.acked.dedup();
        record::write_json_atomic(&self.state_path, &st)
            .map_err(|source| PublishError::WriteFile { path: self.state_path.clone(), source })?;
        // Everything the journal held is in the state file now.
        let journal = record::journal_path(&self.state_path);
        std::fs::File::create(&journal).map_err(|source| PublishError::WriteFile { path: journal, source })?;
        Ok(())
    }

    async fn put_blocks(
        &self,
        snapshot_id: &str,
        todo: Vec<BlockJob>,
        total: u64,
        already: u64,
        state: &Arc<Mutex<UploadState>>,
    ) -> Result<u64, PublishError> {
        let bytes_total = todo.len() as u64 * EBS_BLOCK_SIZE;
        self.progress.begin(&format!("uploading {} blocks", todo.len()), Some(bytes_total), Unit::Bytes);
        let started = Instant::now();
        let file = Arc::new(
            std::fs::File::open(&self.image_path)
                .map_err(|source| PublishError::ReadImage { path: self.image_path.clone(), source })?,
        );
        let sem = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(already));
        let mut set = tokio::task::JoinSet::new();
        let mut last_save = Instant::now();
        let journal_path = record::journal_path(&self.state_path);
        let journal_err = |source| PublishError::WriteFile { path: journal_path.clone(), source };
        let mut journal =
            std::fs::OpenOptions::new().create(true).append(true).open(&journal_path).map_err(journal_err)?;
        let mut sent = 0u64;
        let mut iter = todo.into_iter();
        let mut result = Ok(());
        loop {
            // Keep at most `concurrency` tasks alive; reading happens inside the task after
            // the permit, so memory stays at concurrency × 512 KiB.
            while set.len() < self.concurrency.max(1) {
                let Some(job) = iter.next() else { break };
                let permit = sem.clone().acquire_owned().await.expect("semaphore is never closed");
                let ebs = self.ebs.clone();
                let file = file.clone();
                let path = self.image_path.clone();
                let size = self.image_size_bytes;
                let policy = self.policy;
                let sid = snapshot_id.to_string();
                let done = done.clone();
                set.spawn(async move {
                    let _permit = permit;
                    let data = tokio::task::spawn_blocking(move || read_block(&file, &path, size, job))
                        .await
                        .map_err(|e| PublishError::Protocol(format!("block reader panicked: {e}")))??;
                    let checksum = b64(&job.digest());
                    let index =
                        i32::try_from(job.index).map_err(|_| PublishError::TooManyBlocks { blocks: job.index })?;
                    let pct = (done.load(std::sync::atomic::Ordering::Relaxed) * 100 / total.max(1)) as i32;
                    with_retry(&policy, &format!("PutSnapshotBlock {}", job.index), || {
                        ebs.put_snapshot_block()
                            .snapshot_id(&sid)
                            .block_index(index)
                            .block_data(ByteStream::from(data.clone()))
                            .data_length(BLOCK_LEN_I32)
                            .checksum(&checksum)
                            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                            .progress(pct.min(100))
                            .send()
                    })
                    .await?;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok::<u64, PublishError>(job.index)
                });
            }
            let Some(joined) = set.join_next().await else { break };
            match joined {
                Ok(Ok(index)) => {
                    sent += 1;
                    self.progress.advance(EBS_BLOCK_SIZE);
                    state.lock().unwrap_or_else(|e| e.into_inner()).acked.push(index);
                    // One short append per block (one write(2), whole or not at all for a
                    // killed process); the state file is rewritten about once a second.
                    std::io::Write::write_all(&mut journal, format!("{index}\n").as_bytes()).map_err(journal_err)?;
                    if last_save.elapsed() > Duration::from_secs(1) {
                        self.save_state(state)?;
                        last_save = Instant::now();
                    }
                }
                Ok(Err(e)) => {
                    result = Err(e);
                    break;
                }
                Err(e) => {
                    result = Err(PublishError::Protocol(format!("upload task failed: {e}")));
                    break;
                }
            }
        }
        if result.is_err() {
            set.abort_all();
            // Collect acknowledgements that raced with the failure.
            while let Some(j) = set.join_next().await {
                if let Ok(Ok(index)) = j {
                    state.lock().unwrap_or_else(|e| e.into_inner()).acked.push(index);
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        self.progress.end(&format!(
            "{sent} blocks ({:.1} MiB) in {secs:.1} s, {:.1} MiB/s",
            (sent * EBS_BLOCK_SIZE) as f64 / 1048576.0,
            (sent * EBS_BLOCK_SIZE) as f64 / 1048576.0 / secs.max(1e-6)
        ));
        result.map(|()| sent)
    }
}

/// Reads one block with a positioned read and checks it against the manifest's digest.
fn read_block(file: &std::fs::File, path: &Path, image_size: u64, job: BlockJob) -> Result<bytes::Bytes, PublishError> {
    let mut buf = vec![0u8; EBS_BLOCK_SIZE as usize];
    let Source::Image(expected) = job.source else {
        return Ok(bytes::Bytes::from(buf));
    };
    let offset = job.index.checked_mul(EBS_BLOCK_SIZE).ok_or(PublishError::TooManyBlocks { blocks: job.index })?;
    // The last block of an image whose size is not a multiple of 512 KiB is zero-padded.
    let len = image_size.saturating_sub(offset).min(EBS_BLOCK_SIZE) as usize;
    file.read_exact_at(&mut buf[..len], offset)
        .map_err(|source| PublishError::ReadImage { path: path.to_path_buf(), source })?;
    let found: [u8; 32] = Sha256::digest(&buf).into();
    if found != expected {
        return Err(PublishError::ImageChanged {
            path: path.to_path_buf(),
            index: job.index,
            expected: hex::encode(expected),
            found: hex::encode(found),
        });
    }
    Ok(bytes::Bytes::from(buf))
}

/// Whether the snapshot of an interrupted upload can still take blocks. One that expired (EBS
/// puts a pending snapshot in `error` after its timeout) or was deleted gives the reason it
/// cannot be resumed.
pub async fn still_pending(
    ec2: &aws_sdk_ec2::Client,
    snapshot_id: &str,
    policy: &RetryPolicy,
) -> Result<Result<(), String>, PublishError> {
    use aws_sdk_ec2::types::SnapshotState;
    let out =
        match with_retry(policy, "DescribeSnapshots", || ec2.describe_snapshots().snapshot_ids(snapshot_id).send())
            .await
        {
            Ok(o) => o,
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => return Ok(Err("it no longer exists".into())),
            Err(e) => return Err(e.into()),
        };
    // Only `error` (what an expired pending snapshot becomes) and absence rule it out; a
    // stand-in such as moto may already call a pending snapshot `completed`.
    Ok(match out.snapshots().first().and_then(|s| s.state()) {
        None => Err("it no longer exists".into()),
        Some(SnapshotState::Error) => Err("it is in state error (a pending snapshot expires after its timeout)".into()),
        Some(_) => Ok(()),
    })
}

/// Whether a snapshot kiln remembers can be the parent of a new one: Ok when it exists in this
/// account and is complete, else why not ("no longer exists in this account", "is in state
/// error"). A snapshot of another account (shared with this one, or not) is never a parent.
pub async fn usable_parent(
    ec2: &aws_sdk_ec2::Client,
    snapshot_id: &str,
    policy: &RetryPolicy,
) -> Result<Result<(), String>, PublishError> {
    use aws_sdk_ec2::types::SnapshotState;
    let out = match with_retry(policy, "DescribeSnapshots", || {
        ec2.describe_snapshots().owner_ids("self").snapshot_ids(snapshot_id).send()
    })
    .await
    {
        Ok(o) => o,
        Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {
            return Ok(Err("no longer exists in this account".into()))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(match out.snapshots().iter().find(|s| s.snapshot_id() == Some(snapshot_id)).map(|s| s.state()) {
        None => Err("no longer exists in this account".into()),
        Some(Some(SnapshotState::Completed)) => Ok(()),
        Some(state) => Err(format!(
            "is in state {}, not completed",
            state.map(|s| s.as_str().to_string()).unwrap_or_else(|| "unknown".into())
        )),
    })
}

/// Polls DescribeSnapshots until the snapshot is `completed`.
pub async fn wait_completed(
    ec2: &aws_sdk_ec2::Client,
    snapshot_id: &str,
    policy: &RetryPolicy,
    deadline: &super::Deadline,
    progress: &dyn Progress,
) -> Result<(), PublishError> {
    use aws_sdk_ec2::types::SnapshotState;
    // Completion of a large snapshot takes minutes: poll quickly at first, then every 10 s.
    let mut backoff = super::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    progress.begin(&format!("waiting for snapshot {snapshot_id}"), None, Unit::Items);
    loop {
        let out = with_retry(policy, "DescribeSnapshots", || ec2.describe_snapshots().snapshot_ids(snapshot_id).send())
            .await?;
        let snap = out.snapshots().first();
        match snap.and_then(|s| s.state()) {
            Some(SnapshotState::Completed) => {
                progress.end(&format!("snapshot {snapshot_id} completed"));
                return Ok(());
            }
            Some(SnapshotState::Error) => {
                return Err(PublishError::SnapshotFailed {
                    snapshot_id: snapshot_id.into(),
                    state: "error".into(),
                    message: snap.and_then(|s| s.state_message()).unwrap_or("").into(),
                })
            }
            state => deadline.saw(&format!(
                "snapshot {snapshot_id} {} {}",
                state.map(|s| s.as_str()).unwrap_or("unknown"),
                snap.and_then(|s| s.progress()).unwrap_or("")
            )),
        }
        backoff.pause(deadline, || format!("snapshot {snapshot_id} to complete")).await?;
    }
}
