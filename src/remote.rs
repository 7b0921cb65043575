//! An EBS snapshot (or an AMI's root snapshot) read where it is, through the EBS direct APIs:
//! `ListSnapshotBlocks` says which 512 KiB blocks hold data (and gives each its token), and
//! `GetSnapshotBlock` fetches one, checked against the SHA-256 EBS returns with it. A block
//! never written reads as zeros without a request. [`open`] hands the readers a
//! [`Device`](crate::formats::device::Device), so `kiln inspect`, `--audit` and `kiln diff`
//! read a snapshot with the code that reads an image file, fetching only the blocks they touch.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_ebs::types::ChecksumAlgorithm;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::aws::{with_retry, AwsError, Endpoint, RetryPolicy};
use crate::formats::device::{BlockDevice, Fetch};

/// What a snapshot id or AMI id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotId {
    Image(String),
    Snapshot(String),
}

impl SnapshotId {
    /// `ami-…` or `snap-…` (hex after the dash), else None: the argument is a path.
    pub fn parse(s: &str) -> Option<SnapshotId> {
        let hex = |rest: &str| !rest.is_empty() && rest.len() <= 32 && rest.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(rest) = s.strip_prefix("ami-").filter(|r| hex(r)) {
            Some(SnapshotId::Image(format!("ami-{rest}")))
        } else {
            s.strip_prefix("snap-").filter(|r| hex(r)).map(|rest| SnapshotId::Snapshot(format!("snap-{rest}")))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("{image_id} was not found in {region} (is it in another region, or not shared with this account?)")]
    NoImage { image_id: String, region: String },
    #[error("{image_id} has no EBS root snapshot (an instance-store AMI is a bundle in S3, not a snapshot)")]
    NoRootSnapshot { image_id: String },
    #[error("{snapshot_id}: EBS reported blocks of {block_size} bytes and a {volume_gib} GiB volume; kiln expects 524288-byte blocks")]
    Geometry { snapshot_id: String, block_size: i32, volume_gib: i64 },
    #[error(
        "{snapshot_id}: block {index} does not match the SHA-256 EBS gave for it (sent {expected}, received {found})"
    )]
    Checksum { snapshot_id: String, index: u64, expected: String, found: String },
    #[error("{snapshot_id}: block {index} is {len} bytes, not 524288")]
    ShortBlock { snapshot_id: String, index: u64, len: usize },
    #[error("{snapshot_id}: reading block {index}: {what}")]
    Body { snapshot_id: String, index: u64, what: String },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// A snapshot as `ListSnapshotBlocks` describes it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub snapshot_id: String,
    /// The AMI it was reached through, when it was.
    pub image_id: Option<String>,
    pub region: String,
    pub block_size: u64,
    pub volume_bytes: u64,
    /// Block index → token, for every block that holds data.
    pub blocks: BTreeMap<u64, String>,
    /// The AMI's tags, when reached through one (kiln's `kiln:image-sha256` among them).
    pub image_tags: BTreeMap<String, String>,
}

/// A connection to one region's EBS (and EC2, for AMIs), with its own runtime: the readers
/// are synchronous and call [`Fetch::fetch`] from plain threads.
#[derive(Debug)]
pub struct Remote {
    rt: Arc<tokio::runtime::Runtime>,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    region: String,
    policy: RetryPolicy,
}

impl Remote {
    /// Clients for `region` (else the standard chain's region) at `endpoint_url`.
    pub fn connect(region: Option<String>, endpoint_url: Option<String>) -> Result<Remote, RemoteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let conf = rt.block_on(crate::aws::sdk_config(&Endpoint { region, endpoint_url }));
        let region = conf.region().map(|r| r.to_string()).unwrap_or_default();
        Ok(Remote {
            rt: Arc::new(rt),
            ebs: crate::aws::ebs_client(&conf),
            ec2: crate::aws::ec2_client(&conf),
            region,
            policy: RetryPolicy::default(),
        })
    }

    /// The snapshot `id` names (an AMI's root snapshot), with its block list.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<Snapshot, RemoteError> {
        self.rt.block_on(async {
            let (snapshot_id, image_id, image_tags) = match id {
                SnapshotId::Snapshot(s) => (s.clone(), None, BTreeMap::new()),
                SnapshotId::Image(image_id) => {
                    let out = with_retry(&self.policy, "DescribeImages", || {
                        self.ec2.describe_images().image_ids(image_id).send()
                    })
                    .await;
                    let out = match out {
                        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                            return Err(RemoteError::NoImage {
                                image_id: image_id.clone(),
                                region: self.region.clone(),
                            })
                        }
                        other => other?,
                    };
                    let img = out.images().first().ok_or_else(|| RemoteError::NoImage {
                        image_id: image_id.clone(),
                        region: self.region.clone(),
                    })?;
                    let maps = img.block_device_mappings();
                    let root = maps
                        .iter()
                        .find(|m| m.device_name() == img.root_device_name())
                        .or_else(|| maps.first())
                        .and_then(|m| m.ebs())
                        .and_then(|e| e.snapshot_id())
                        .ok_or_else(|| RemoteError::NoRootSnapshot { image_id: image_id.clone() })?;
                    let tags = img
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                        .collect();
                    (root.to_string(), Some(image_id.clone()), tags)
                }
            };
            let mut blocks = BTreeMap::new();
            let mut next: Option<String> = None;
            let (block_size, volume_gib) = loop {
                let out = with_retry(&self.policy, "ListSnapshotBlocks", || {
                    self.ebs
                        .list_snapshot_blocks()
                        .snapshot_id(&snapshot_id)
                        .max_results(10_000)
                        .set_next_token(next.clone())
                        .send()
                })
                .await?;
                for b in out.blocks() {
                    if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                        blocks.insert(u64::from(i as u32), t.to_string());
                    }
                }
                let geometry = (out.block_size().unwrap_or(0), out.volume_size().unwrap_or(0));
                next = out.next_token().filter(|t| !t.is_empty()).map(str::to_string);
                if next.is_none() {
                    break geometry;
                }
            };
            if block_size != crate::manifest::EBS_BLOCK_SIZE as i32 || volume_gib <= 0 {
                return Err(RemoteError::Geometry { snapshot_id, block_size, volume_gib });
            }
            let volume_bytes = volume_gib as u64 * (1 << 30);
            let block_size = block_size as u64;
            // A listed block past the volume would make readers fetch what no disk holds.
            blocks.retain(|i, _| i * block_size < volume_bytes);
            Ok(Snapshot {
                snapshot_id,
                image_id,
                region: self.region.clone(),
                block_size,
                volume_bytes,
                blocks,
                image_tags,
            })
        })
    }

    /// Block `index` of `snap` (which must list it), checked against EBS's SHA-256.
    pub async fn get_block(&self, snap: &Snapshot, index: u64, token: &str) -> Result<Vec<u8>, RemoteError> {
        let sid = &snap.snapshot_id;
        let body = |what: String| RemoteError::Body { snapshot_id: sid.clone(), index, what };
        let out = with_retry(&self.policy, &format!("GetSnapshotBlock {index}"), || {
            self.ebs.get_snapshot_block().snapshot_id(sid).block_index(index as i32).block_token(token).send()
        })
        .await?;
        let expected = out.checksum().map(str::to_string);
        let algorithm = out.checksum_algorithm().cloned();
        let data = out.block_data.collect().await.map_err(|e| body(e.to_string()))?.into_bytes().to_vec();
        if data.len() as u64 != snap.block_size {
            return Err(RemoteError::ShortBlock { snapshot_id: sid.clone(), index, len: data.len() });
        }
        if let (Some(expected), Some(ChecksumAlgorithm::ChecksumAlgorithmSha256) | None) = (&expected, &algorithm) {
            let found = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&data));
            if &found != expected {
                return Err(RemoteError::Checksum {
                    snapshot_id: sid.clone(),
                    index,
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(data)
    }

    pub fn runtime(&self) -> &Arc<tokio::runtime::Runtime> {
        &self.rt
    }
}

/// [`Fetch`] for a snapshot: the readers' block requests become `GetSnapshotBlock` calls.
#[derive(Debug)]
pub struct EbsFetch {
    remote: Arc<Remote>,
    snap: Snapshot,
}

impl EbsFetch {
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }
}

impl Fetch for EbsFetch {
    fn block_size(&self) -> u64 {
        self.snap.block_size
    }
    fn size(&self) -> u64 {
        self.snap.volume_bytes
    }
    fn fetch(&self, index: u64) -> std::io::Result<Option<Vec<u8>>> {
        let Some(token) = self.snap.blocks.get(&index) else { return Ok(None) };
        self.remote
            .rt
            .block_on(self.remote.get_block(&self.snap, index, token))
            .map(Some)
            .map_err(|e| std::io::Error::other(crate::message::render_error(&e)))
    }
    fn name(&self) -> String {
        match &self.snap.image_id {
            Some(ami) => format!("{ami} ({})", self.snap.snapshot_id),
            None => self.snap.snapshot_id.clone(),
        }
    }
}

/// The default bound of a remote reader's block cache: 512 blocks of 512 KiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// The snapshot `id` names as a disk the readers read, through a cache of `cache_bytes`.
pub fn open(remote: Arc<Remote>, id: &SnapshotId, cache_bytes: u64) -> Result<Arc<BlockDevice<EbsFetch>>, RemoteError> {
    let snap = remote.snapshot(id)?;
    Ok(Arc::new(BlockDevice::new(EbsFetch { remote, snap }, cache_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_told_from_paths() {
        assert_eq!(SnapshotId::parse("ami-0123abcd"), Some(SnapshotId::Image("ami-0123abcd".into())));
        assert_eq!(
            SnapshotId::parse("snap-0fedcba9876543210"),
            Some(SnapshotId::Snapshot("snap-0fedcba9876543210".into()))
        );
        for path in ["ami-", "out/ami-0123.raw", "snap-xyz", "image.raw", "ami-12/34"] {
            assert_eq!(SnapshotId::parse(path), None, "{path}");
        }
    }
}
