//! What publishing leaves beside the manifest: the publish record (`NAME.publish.json`) and,
//! while an upload is under way, the resume state (`NAME.publish-state.json`). Both are written
//! to a temporary name in the same directory and renamed, so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ec2::Delivery;

/// The result of a publish, one entry per region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRecord {
    pub name: String,
    pub image_sha256: String,
    pub recipe_sha256: String,
    /// The region the snapshot was uploaded to.
    pub source_region: String,
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<String>,
    /// Blocks sent by this run (zero when an existing snapshot or AMI was reused).
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    /// Data blocks the snapshot took unchanged from its parent instead of being sent.
    #[serde(default)]
    pub blocks_inherited: u64,
    /// When every AMI of this publish is deprecated (`[ami] deprecate_after`), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecate_at: Option<String>,
    /// Why a remembered parent was not used, and the like.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// SSM parameters (`[ami.ssm]`), per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<super::ssm::Parameter>,
    /// What retention (`[ami] keep`) removed and kept, per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<super::prune::RegionPrune>,
    pub ami_name: String,
    /// The regions the AMI is in, the first region first.
    pub amis: Vec<RegionImage>,
    /// Regions this publish did not reach, and why; running it again finishes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<RegionFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionFailure {
    pub region: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub region: String,
    pub image_id: String,
    pub snapshot_id: String,
    /// True when the AMI already existed (same name and image SHA-256) and was reused.
    pub reused: bool,
    /// `upload` for the first region and those with their own upload, `copy` for CopyImage.
    #[serde(default)]
    pub via: Delivery,
}

/// Resume state of one upload: which snapshot, and which blocks EBS acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub image_sha256: String,
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<String>,
    /// Acknowledged block indexes, ascending.
    pub acked: Vec<u64>,
}

/// `out/NAME.manifest.json` → `out/NAME.publish.json`.
pub fn record_path(manifest_path: &Path) -> PathBuf {
    crate::outputs::Outputs::of(manifest_path).publish_record()
}

/// `out/NAME.manifest.json` → `out/NAME.publish-state.json` (`NAME.REGION.…` for a region with
/// its own upload).
pub fn state_path(manifest_path: &Path, region: Option<&str>) -> PathBuf {
    crate::outputs::Outputs::of(manifest_path).publish_state(region)
}

/// Writes `value` as pretty JSON to `path` through a temp file and a rename.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    text.push(b'\n');
    crate::formats::atomic::write(path, &text)
}

/// Acknowledgements since the state file was last written, beside it: one decimal block
/// index per line, appended as EBS answers each block, so an upload killed at any moment
/// (SIGKILL) loses at most the blocks that were in flight. Writing the state file empties it.
pub fn journal_path(state_path: &Path) -> PathBuf {
    state_path.with_extension("acks")
}

/// The resume state, with the journal's acknowledgements merged in.
pub fn read_state(path: &Path) -> std::io::Result<Option<UploadState>> {
    let mut st: UploadState = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let journal = match std::fs::read_to_string(journal_path(path)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    // A line without its newline was cut short by the kill: it does not count.
    st.acked.extend(journal.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')?.parse::<u64>().ok()));
    st.acked.sort_unstable();
    st.acked.dedup();
    Ok(Some(st))
}
