//! Packer's manifest post-processor output (`packer-manifest.json`), written by
//! `kiln publish --packer-manifest FILE`, so pipelines built around Packer read kiln's AMIs
//! with the glue they have: `builds[]` with `artifact_id` as `region:ami-…,region:ami-…`,
//! `builder_type` `amazon-ebs`, and `last_run_uuid` naming the newest build. As Packer does, an
//! existing manifest gains a build instead of being replaced.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::PublishRecord;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackerManifest {
    pub builds: Vec<PackerBuild>,
    pub last_run_uuid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackerBuild {
    pub name: String,
    pub builder_type: String,
    /// Unix seconds.
    pub build_time: i64,
    pub files: Option<Vec<serde_json::Value>>,
    pub artifact_id: String,
    pub packer_run_uuid: String,
    /// Packer's `custom_data` is a map of strings.
    pub custom_data: std::collections::BTreeMap<String, String>,
}

/// The build entry for a publish: every region's AMI, and what kiln knows besides.
pub fn build(rec: &PublishRecord, kiln_version: &str, now: i64) -> PackerBuild {
    let artifact_id = rec.amis.iter().map(|a| format!("{}:{}", a.region, a.image_id)).collect::<Vec<_>>().join(",");
    // A run id that names this publish: the same AMIs give the same id.
    let h = Sha256::digest(format!("{}\0{artifact_id}", rec.image_sha256));
    let mut u = [0u8; 16];
    u.copy_from_slice(&h[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let uuid = uuid::Uuid::from_bytes(u).hyphenated().to_string();
    let custom_data = [
        ("image_sha256", rec.image_sha256.clone()),
        ("recipe_sha256", rec.recipe_sha256.clone()),
        ("ami_name", rec.ami_name.clone()),
        ("snapshot_id", rec.snapshot_id.clone()),
        ("source_region", rec.source_region.clone()),
        ("kiln_version", kiln_version.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    PackerBuild {
        name: rec.name.clone(),
        builder_type: "amazon-ebs".into(),
        build_time: now,
        files: None,
        artifact_id,
        packer_run_uuid: uuid,
        custom_data,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackerError {
    #[error("{path}: not a Packer manifest ({why}); move it away or name another file")]
    NotPacker { path: String, why: String },
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Adds `b` to the manifest at `path` (made when missing), as the newest run.
pub fn append(path: &Path, b: PackerBuild) -> Result<PackerManifest, PackerError> {
    let shown = path.display().to_string();
    let mut m = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<PackerManifest>(&bytes)
            .map_err(|e| PackerError::NotPacker { path: shown.clone(), why: e.to_string() })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            PackerManifest { builds: Vec::new(), last_run_uuid: String::new() }
        }
        Err(source) => return Err(PackerError::Io { path: shown, source }),
    };
    m.last_run_uuid = b.packer_run_uuid.clone();
    // The same publish again (a re-run) replaces its entry rather than listing it twice.
    m.builds.retain(|x| x.packer_run_uuid != b.packer_run_uuid);
    m.builds.push(b);
    let mut json = serde_json::to_vec_pretty(&m).expect("serialisable");
    json.push(b'\n');
    crate::formats::atomic::write(path, &json).map_err(|source| PackerError::Io { path: shown, source })?;
    Ok(m)
}
