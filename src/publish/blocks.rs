//! Which blocks an upload sends: a pure function of the manifests and the upload's kind, so
//! every case is decided (and unit-tested) without AWS.
//!
//! - A new snapshot gets the image's data blocks; blocks never written read back as zeros.
//! - An incremental snapshot (a parent) gets the blocks whose digest changed, and zeros for
//!   blocks that held data in the parent but are zeros now (they would be inherited).
//! - An encrypted snapshot without a parent gets every block of the image, zeros included:
//!   EBS reads back undefined data for blocks never written to one (see docs/publish.md).
//! - A resumed upload sends what EBS has not acknowledged yet.
//!
//! The plan's types ([`BlockJob`], [`Source`]) live here: the uploader (`ebs`) carries them
//! out and imports them, never the other way round.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::manifest::{BlockMap, EBS_BLOCK_SIZE};

/// Where a block's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Read from the raw image; the digest is the manifest's, checked after the read.
    Image([u8; 32]),
    /// A block of zeros: never read, its digest is a constant.
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    pub index: u64,
    pub source: Source,
}

impl BlockJob {
    pub fn digest(&self) -> [u8; 32] {
        match self.source {
            Source::Image(d) => d,
            Source::Zero => zero_block_digest(),
        }
    }
}

/// SHA-256 of 524288 zero bytes.
pub fn zero_block_digest() -> [u8; 32] {
    static D: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *D.get_or_init(|| Sha256::digest(vec![0u8; EBS_BLOCK_SIZE as usize]).into())
}

/// A manifest the blocks cannot be planned from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockPlanError {
    #[error("manifest block size is {0}, EBS needs {EBS_BLOCK_SIZE}")]
    BlockSize(u64),
    #[error("manifest lists block {last}, but the image has only {blocks} blocks")]
    PastTheEnd { last: u64, blocks: u64 },
}

/// What is uploaded to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A new, unencrypted snapshot.
    New,
    /// A new encrypted snapshot.
    Encrypted,
    /// A snapshot on top of the parent's, whose manifest lists these blocks.
    Child { parent: &'a BlockMap },
}

/// The blocks to send for an image of `image_bytes` whose data blocks are `image`, in
/// ascending order.
pub fn blocks_to_send(image: &BlockMap, image_bytes: u64, target: Target) -> Result<Vec<BlockJob>, BlockPlanError> {
    let data = digests(image)?;
    let image_blocks = image_bytes.div_ceil(EBS_BLOCK_SIZE);
    if let Some((&last, _)) = data.last_key_value() {
        if last >= image_blocks {
            return Err(BlockPlanError::PastTheEnd { last, blocks: image_blocks });
        }
    }
    let mut jobs = Vec::new();
    match target {
        Target::Child { parent } => {
            let old = digests(parent)?;
            for (&i, &d) in &data {
                if old.get(&i) != Some(&d) {
                    jobs.push(BlockJob { index: i, source: Source::Image(d) });
                }
            }
            // The snapshot is as large as the image's volume: parent blocks past it are gone.
            let volume_blocks = volume_blocks(image_bytes);
            for &i in old.keys() {
                if !data.contains_key(&i) && i < volume_blocks {
                    jobs.push(BlockJob { index: i, source: Source::Zero });
                }
            }
        }
        Target::Encrypted => {
            for i in 0..image_blocks {
                jobs.push(BlockJob { index: i, source: data.get(&i).map_or(Source::Zero, |&d| Source::Image(d)) });
            }
        }
        Target::New => {
            jobs.extend(data.iter().map(|(&i, &d)| BlockJob { index: i, source: Source::Image(d) }));
        }
    }
    jobs.sort_by_key(|j| j.index);
    Ok(jobs)
}

/// What is left of `jobs` once the blocks EBS acknowledged are left out.
pub fn still_to_send(jobs: &[BlockJob], acknowledged: &BTreeSet<u64>) -> Vec<BlockJob> {
    jobs.iter().filter(|j| !acknowledged.contains(&j.index)).copied().collect()
}

/// Blocks in the snapshot of an image of `image_bytes`: its volume is whole GiB, at least 1.
pub fn volume_blocks(image_bytes: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    image_bytes.div_ceil(GIB).max(1) * (GIB / EBS_BLOCK_SIZE)
}

fn digests(map: &BlockMap) -> Result<BTreeMap<u64, [u8; 32]>, BlockPlanError> {
    if map.block_size != EBS_BLOCK_SIZE {
        return Err(BlockPlanError::BlockSize(map.block_size));
    }
    Ok(map.data_blocks.iter().map(|b| (b.index, b.sha256.0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BlockDigest, Sha256Digest};

    const BS: u64 = EBS_BLOCK_SIZE;

    fn map(blocks: &[(u64, u8)]) -> BlockMap {
        BlockMap {
            block_size: BS,
            data_blocks: blocks
                .iter()
                .map(|&(index, b)| BlockDigest { index, sha256: Sha256Digest([b; 32]) })
                .collect(),
        }
    }

    fn plan(jobs: &[BlockJob]) -> Vec<(u64, Option<u8>)> {
        jobs.iter()
            .map(|j| {
                (
                    j.index,
                    match j.source {
                        Source::Image(d) => Some(d[0]),
                        Source::Zero => None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_new_snapshot_gets_the_data_blocks_only() {
        let jobs = blocks_to_send(&map(&[(7, 2), (0, 1)]), 10 * BS, Target::New).unwrap();
        assert_eq!(plan(&jobs), [(0, Some(1)), (7, Some(2))]);
    }

    #[test]
    fn an_encrypted_snapshot_gets_every_block_of_the_image() {
        let jobs = blocks_to_send(&map(&[(1, 5)]), 3 * BS + 1, Target::Encrypted).unwrap();
        assert_eq!(plan(&jobs), [(0, None), (1, Some(5)), (2, None), (3, None)]);
    }

    #[test]
    fn an_incremental_snapshot_gets_changes_and_zeros_for_cleared_blocks() {
        let parent = map(&[(0, 1), (1, 2), (2, 3), (5000, 9)]);
        let image = map(&[(0, 1), (1, 7), (4, 4)]);
        let jobs = blocks_to_send(&image, 8 * BS, Target::Child { parent: &parent }).unwrap();
        // Block 0 unchanged; 1 changed; 2 cleared; 4 new; 5000 lies past the 1 GiB volume.
        assert_eq!(plan(&jobs), [(1, Some(7)), (2, None), (4, Some(4))]);
        // An unchanged image sends nothing.
        assert!(blocks_to_send(&parent, 5001 * BS, Target::Child { parent: &parent }).unwrap().is_empty());
    }

    #[test]
    fn a_resumed_upload_sends_what_was_not_acknowledged() {
        let jobs = blocks_to_send(&map(&[(0, 1), (1, 2), (2, 3)]), 4 * BS, Target::Encrypted).unwrap();
        let left = still_to_send(&jobs, &[0, 2].into_iter().collect());
        assert_eq!(plan(&left), [(1, Some(2)), (3, None)]);
    }

    #[test]
    fn malformed_manifests_are_refused() {
        // A malformed digest never gets this far: the manifest loader refuses it (see
        // kiln_model::manifest's tests).
        assert_eq!(
            blocks_to_send(&map(&[(3, 1)]), 2 * BS, Target::New),
            Err(BlockPlanError::PastTheEnd { last: 3, blocks: 2 })
        );
        let small = BlockMap { block_size: 4096, data_blocks: vec![] };
        assert_eq!(blocks_to_send(&small, BS, Target::New), Err(BlockPlanError::BlockSize(4096)));
        assert_eq!(
            blocks_to_send(&map(&[]), BS, Target::Child { parent: &small }),
            Err(BlockPlanError::BlockSize(4096))
        );
    }
}
