//! What kiln remembers of each image it published, so the next publish of the same image name
//! uploads only what changed, with no flags: the snapshot and the manifest it was made from,
//! per endpoint, region and image name, in kiln's state directory. Not in `out/`, which a
//! nightly job may wipe between builds.
//!
//! A remembered snapshot is a parent only if it can be one: same block size, encryption
//! settings unchanged, a volume no larger than the new one, and (asked of EC2) still there,
//! owned by this account and complete. Otherwise the upload is a full one, with a note that
//! says why.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{AmiSettings, Manifest, EBS_BLOCK_SIZE};

/// Bumped when the file's meaning changes; a file of another version is ignored (the upload
/// is then a full one), never misread.
const HISTORY_VERSION: u32 = 1;

/// The last snapshot published for one image name in one region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub version: u32,
    pub snapshot_id: String,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// The manifest of the image the snapshot holds: its block digests decide what changed.
    pub manifest: Manifest,
}

impl Published {
    pub fn new(snapshot_id: String, settings: &AmiSettings, manifest: Manifest) -> Published {
        Published {
            version: HISTORY_VERSION,
            snapshot_id,
            encrypted: settings.encrypted,
            kms_key_arn: settings.kms_key_arn.clone(),
            manifest,
        }
    }
}

/// `--state-dir`, else `KILN_STATE_DIR`, `$XDG_STATE_HOME/kiln`, `~/.local/state/kiln`.
pub fn default_state_dir() -> PathBuf {
    crate::dirs::kiln_dir("KILN_STATE_DIR", "XDG_STATE_HOME", ".local/state/kiln", "/var/lib/kiln")
}

/// `STATE/published/ENDPOINT/REGION/NAME.json` (see [`relative`]).
pub fn path(state_dir: &Path, endpoint_url: Option<&str>, region: &str, image_name: &str) -> PathBuf {
    state_dir.join(relative(endpoint_url, region, image_name))
}

/// `published/ENDPOINT/REGION/NAME.json`, the same under a state directory and a shared state
/// URL. ENDPOINT is `aws`, or for another endpoint (a stand-in, a private endpoint) a digest
/// of its URL, so their snapshots never pass for each other's.
pub fn relative(endpoint_url: Option<&str>, region: &str, image_name: &str) -> String {
    format!("published/{}/{}/{}.json", endpoint(endpoint_url), safe(region), safe(image_name))
}

/// `published/ENDPOINT/NAME.lease`: one publish of an image name at a time, whatever its
/// regions, in a shared state ([`crate::share::state::Lease`]).
pub fn lease(endpoint_url: Option<&str>, image_name: &str) -> String {
    format!("published/{}/{}.lease", endpoint(endpoint_url), safe(image_name))
}

fn endpoint(endpoint_url: Option<&str>) -> String {
    match endpoint_url {
        None => "aws".to_string(),
        Some(url) => format!("endpoint-{}", &hex::encode(Sha256::digest(url.trim_end_matches('/')))[..16]),
    }
}

/// Where one image name's history lives in one region: the state directory, the shared
/// state, or both (the shared one is then the truth, the local file a copy of it).
#[derive(Clone)]
pub struct Place {
    pub local: Option<PathBuf>,
    pub shared: Option<(crate::share::Store, String)>,
}

/// What a publish read of its history, and what its write must match.
#[derive(Debug, Clone, Default)]
pub struct Recalled {
    pub published: Option<Published>,
    /// The shared record's version as read (none read when there is no shared state).
    pub read: crate::share::state::ReadRecord,
}

impl Place {
    /// The last publish remembered here: the shared record when there is a shared state,
    /// else the local file.
    pub async fn recall(&self) -> Result<Recalled, crate::share::ShareError> {
        match &self.shared {
            Some((store, name)) => {
                let read = crate::share::state::read(store, name).await?;
                let published = read.bytes.as_deref().and_then(parse);
                Ok(Recalled { published, read })
            }
            None => Ok(Recalled { published: self.local.as_deref().and_then(load), read: Default::default() }),
        }
    }

    /// Remembers `published` locally and in the shared state; Ok(false) when the shared record
    /// changed since `recalled` read it (another runner published in between).
    pub async fn remember(&self, published: &Published, recalled: &Recalled) -> Result<bool, std::io::Error> {
        // The shared record first: the local copy follows it, never leads it.
        if let Some((store, name)) = &self.shared {
            let bytes = serde_json::to_vec_pretty(published).map_err(std::io::Error::other)?;
            let won =
                crate::share::state::write(store, name, bytes, &recalled.read).await.map_err(std::io::Error::other)?;
            if !won {
                return Ok(false);
            }
        }
        if let Some(p) = &self.local {
            save(p, published)?;
        }
        Ok(true)
    }

    /// For messages: the shared record's URL, else the local file.
    pub fn show(&self) -> String {
        match (&self.shared, &self.local) {
            (Some((store, name)), _) => store.url().show(name),
            (None, Some(p)) => p.display().to_string(),
            (None, None) => String::new(),
        }
    }
}

/// A name as one path component: itself when it is plainly one, else a digest of it.
fn safe(name: &str) -> String {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        name.to_string()
    } else {
        format!("name-{}", &hex::encode(Sha256::digest(name))[..16])
    }
}

/// The remembered snapshot at `path`; None when there is none, or it is unreadable or of
/// another version (a full upload is always correct, a misread parent never is).
pub fn load(path: &Path) -> Option<Published> {
    parse(&std::fs::read(path).ok()?)
}

fn parse(bytes: &[u8]) -> Option<Published> {
    serde_json::from_slice::<Published>(bytes).ok().filter(|p| p.version == HISTORY_VERSION)
}

/// Remembers a published snapshot (atomically: a crash leaves the old entry or the new one).
pub fn save(path: &Path, published: &Published) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    super::record::write_json_atomic(path, published)
}

/// Why the remembered snapshot cannot be the parent of this image's snapshot, judged from
/// what kiln remembers alone (EC2 is asked afterwards whether it still exists); None when it
/// can. An identical image is no parent either: its snapshot is reused as it is.
pub fn unusable(prev: &Published, manifest: &Manifest, settings: &AmiSettings) -> Option<String> {
    let id = &prev.snapshot_id;
    if prev.manifest.image.sha256 == manifest.image.sha256 {
        return Some(format!("snapshot {id} already holds this image"));
    }
    if prev.manifest.blocks.block_size != EBS_BLOCK_SIZE {
        return Some(format!(
            "the manifest of snapshot {id} has {}-byte blocks, not {EBS_BLOCK_SIZE}",
            prev.manifest.blocks.block_size
        ));
    }
    if prev.encrypted != settings.encrypted || prev.kms_key_arn != settings.kms_key_arn {
        return Some(format!("snapshot {id} was made with other encryption settings"));
    }
    let gib = |bytes: u64| bytes.div_ceil(1 << 30).max(1);
    if gib(prev.manifest.image.size_bytes) > gib(manifest.image.size_bytes) {
        return Some(format!(
            "snapshot {id} is larger ({} GiB) than the new image's volume ({} GiB)",
            gib(prev.manifest.image.size_bytes),
            gib(manifest.image.size_bytes)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(sha: &str, size_bytes: u64) -> Manifest {
        let mut m: Manifest =
            serde_json::from_str(include_str!("../../fixtures/manifest/ec2.manifest.json")).expect("fixture parses");
        m.image.sha256 = sha.into();
        m.image.size_bytes = size_bytes;
        m
    }

    fn remembered(m: Manifest) -> (Published, AmiSettings) {
        let settings = m.ami.clone().expect("fixture has [ami]");
        (Published::new("snap-0123456789abcdef0".into(), &settings, m), settings)
    }

    #[test]
    fn a_usable_parent_is_used() {
        let (prev, settings) = remembered(manifest("aa", 4 << 30));
        assert_eq!(unusable(&prev, &manifest("bb", 4 << 30), &settings), None);
        // A larger new image is fine: the child's volume only has to be as large.
        assert_eq!(unusable(&prev, &manifest("bb", 8 << 30), &settings), None);
    }

    #[test]
    fn each_reason_a_parent_cannot_be_used_is_said() {
        let (prev, settings) = remembered(manifest("aa", 4 << 30));
        let why = |p: &Published, m: &Manifest, s: &AmiSettings| unusable(p, m, s).unwrap_or_default();
        assert!(why(&prev, &manifest("aa", 4 << 30), &settings).contains("already holds this image"));
        assert!(why(&prev, &manifest("bb", 2 << 30), &settings)
            .contains("larger (4 GiB) than the new image's volume (2 GiB)"));
        let mut enc = settings.clone();
        enc.encrypted = true;
        assert!(why(&prev, &manifest("bb", 4 << 30), &enc).contains("other encryption settings"));
        let mut key = settings.clone();
        key.kms_key_arn = Some("arn:aws:kms:us-east-1:111122223333:key/1".into());
        assert!(why(&prev, &manifest("bb", 4 << 30), &key).contains("other encryption settings"));
        let mut odd = prev.clone();
        odd.manifest.blocks.block_size = 4096;
        assert!(why(&odd, &manifest("bb", 4 << 30), &settings).contains("4096-byte blocks"));
    }

    #[test]
    fn entries_are_kept_apart_by_endpoint_region_and_name() {
        let d = Path::new("/state");
        let aws = path(d, None, "us-east-1", "web-x86_64");
        assert_eq!(aws, Path::new("/state/published/aws/us-east-1/web-x86_64.json"));
        let moto = path(d, Some("http://127.0.0.1:5000"), "us-east-1", "web-x86_64");
        assert_ne!(moto, aws);
        assert_eq!(moto, path(d, Some("http://127.0.0.1:5000/"), "us-east-1", "web-x86_64"));
        assert_ne!(moto, path(d, Some("http://127.0.0.1:5001"), "us-east-1", "web-x86_64"));
        // A name that is no plain path component cannot climb out of the state directory.
        let odd = path(d, None, "../x", "../../etc/passwd");
        assert!(odd.starts_with("/state/published/aws/") && !odd.to_string_lossy().contains(".."), "{odd:?}");
    }

    #[test]
    fn a_saved_entry_loads_back_and_another_version_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/web.json");
        let (prev, _) = remembered(manifest("aa", 4 << 30));
        save(&p, &prev).unwrap();
        let back = load(&p).expect("loads");
        assert_eq!((back.snapshot_id.as_str(), back.manifest.image.sha256.as_str()), ("snap-0123456789abcdef0", "aa"));
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v["version"] = 99.into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(load(&p).is_none());
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p).is_none());
    }
}
