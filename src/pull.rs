//! `kiln pull`: an EBS snapshot (or an AMI's root snapshot) brought home as a sparse raw image
//! and a manifest of its data blocks, so an AMI made anywhere can be tested, compared or
//! published again. Only the blocks EBS lists are fetched, each checked against EBS's SHA-256;
//! a pull that stops keeps what it fetched (`NAME.raw.part` and `NAME.pull-state`) and the next
//! one goes on from there. The image appears under its name only when complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::formats::image::{BlockDigest, BlockMap};
use crate::formats::progress::{Progress, Unit};
use crate::remote::{Remote, RemoteError, Snapshot, SnapshotId};

/// What a pull left, as `NAME.pull.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullManifest {
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    pub region: String,
    pub volume_bytes: u64,
    pub image: PulledImage,
    /// The blocks EBS lists, each by the SHA-256 of its bytes: the same form, and for an image
    /// kiln published the same values, as the build manifest's `blocks`.
    pub blocks: BlockMap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PulledImage {
    pub file: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// The AMI's `kiln:image-sha256` tag, when it has one; a pull that does not match it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tagged_sha256: Option<String>,
}

impl PullManifest {
    /// The pull manifest `path` is, or the one beside the image `path` (`NAME.raw` →
    /// `NAME.pull.json`), with the image it describes; None when there is none.
    pub fn beside(path: &Path) -> Result<Option<(PathBuf, PullManifest)>, String> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let manifest = if name.ends_with(".pull.json") {
            path.to_path_buf()
        } else if let Some(stem) = name.strip_suffix(".raw") {
            path.with_file_name(format!("{stem}.pull.json"))
        } else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&manifest) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", manifest.display())),
        };
        let m: PullManifest =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a pull manifest: {e}", manifest.display()))?;
        if m.image.file.contains('/') || m.image.file.is_empty() {
            return Err(format!("{}: image.file must be a file name beside it", manifest.display()));
        }
        Ok(Some((manifest.with_file_name(&m.image.file), m)))
    }
}

/// What this run did, besides the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Pulled {
    pub manifest: PullManifest,
    pub image_path: PathBuf,
    pub manifest_path: PathBuf,
    pub blocks_fetched: u64,
    /// Blocks an earlier, interrupted pull had already fetched (checked again, not fetched).
    pub blocks_resumed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "the pulled image's SHA-256 is {found}, but {image_id} is tagged kiln:image-sha256={tagged}; \
         the partial image is kept as {part} for a look"
    )]
    TagMismatch { image_id: String, tagged: String, found: String, part: PathBuf },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io { path: path.to_path_buf(), source }
}

/// Pulls `id` into `dir` as `NAME.raw` and `NAME.pull.json` (NAME: the AMI or snapshot id),
/// fetching `concurrency` blocks at a time.
pub fn pull(
    remote: Arc<Remote>,
    id: &SnapshotId,
    dir: &Path,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<Pulled, PullError> {
    let snap = remote.snapshot(id)?;
    let name = snap.image_id.clone().unwrap_or_else(|| snap.snapshot_id.clone());
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let image_path = dir.join(format!("{name}.raw"));
    let part = dir.join(format!("{name}.raw.part"));
    let state_path = dir.join(format!("{name}.pull-state"));
    let manifest_path = dir.join(format!("{name}.pull.json"));

    // Pulled before, and still what was pulled: nothing to fetch.
    if let Ok(Some((image, m))) = PullManifest::beside(&manifest_path) {
        let same = m.snapshot_id == snap.snapshot_id
            && std::fs::metadata(&image).is_ok_and(|md| md.len() == m.image.size_bytes)
            && crate::share::file_sha256(&image).is_ok_and(|d| d == m.image.sha256);
        if same {
            let kept = m.blocks.data_blocks.len() as u64;
            return Ok(Pulled {
                manifest: m,
                image_path: image,
                manifest_path,
                blocks_fetched: 0,
                blocks_resumed: kept,
            });
        }
    }
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&part).map_err(io(&part))?;
    let mut done = resumable(&state_path, &snap, &file)?;
    let blocks_resumed = done.len() as u64;
    file.set_len(snap.volume_bytes).map_err(io(&part))?;
    let mut state = OpenOptions::new().create(true).append(true).open(&state_path).map_err(io(&state_path))?;
    if blocks_resumed == 0 {
        state.set_len(0).map_err(io(&state_path))?;
        writeln!(state, "{}", snap.snapshot_id).map_err(io(&state_path))?;
    }

    let todo: Vec<(u64, String)> =
        snap.blocks.iter().filter(|(i, _)| !done.contains_key(i)).map(|(i, t)| (*i, t.clone())).collect();
    progress.begin(&format!("pulling {name}"), Some(snap.blocks.len() as u64 * snap.block_size), Unit::Bytes);
    progress.advance(blocks_resumed * snap.block_size);
    let fetched = remote.runtime().block_on(async {
        let mut results = futures_util::stream::iter(todo.iter())
            .map(|(index, token)| {
                let (remote, snap) = (&remote, &snap);
                async move { (*index, remote.get_block(snap, *index, token).await) }
            })
            .buffer_unordered(concurrency.max(1));
        let mut n = 0u64;
        while let Some((index, block)) = results.next().await {
            let block = block?;
            file.write_all_at(&block, index * snap.block_size).map_err(io(&part))?;
            let digest = hex::encode(Sha256::digest(&block));
            // The line is written after the block: a line always names a block on disk (or
            // one the page cache lost in a crash, which the resume check catches).
            writeln!(state, "{index} {digest}").map_err(io(&state_path))?;
            done.insert(index, digest);
            progress.advance(snap.block_size);
            n += 1;
        }
        Ok::<u64, PullError>(n)
    })?;

    let size_bytes = disk_extent(&file, &snap).map_err(io(&part))?;
    file.set_len(size_bytes).map_err(io(&part))?;
    file.sync_all().map_err(io(&part))?;
    // The file is `size_bytes` long now: its digest is the image's.
    let sha256 = crate::share::file_sha256(&part).map_err(io(&part))?;
    progress.end(&format!("{} data blocks, {} fetched now", snap.blocks.len(), fetched));
    let tagged_sha256 = snap.image_tags.get(crate::publish::ami::TAG_IMAGE_SHA).cloned();
    if let Some(tagged) = tagged_sha256.as_ref().filter(|t| **t != sha256) {
        return Err(PullError::TagMismatch { image_id: name, tagged: tagged.clone(), found: sha256, part });
    }
    let manifest = PullManifest {
        snapshot_id: snap.snapshot_id.clone(),
        image_id: snap.image_id.clone(),
        region: snap.region.clone(),
        volume_bytes: snap.volume_bytes,
        image: PulledImage {
            file: image_path.file_name().expect("file name").to_string_lossy().into_owned(),
            size_bytes,
            sha256,
            tagged_sha256,
        },
        blocks: BlockMap {
            block_size: snap.block_size,
            data_blocks: done
                .into_iter()
                .filter(|(i, _)| i * snap.block_size < size_bytes)
                .map(|(index, sha256)| BlockDigest { index, sha256 })
                .collect(),
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("serialisable");
    crate::formats::atomic::write(&manifest_path, &json).map_err(io(&manifest_path))?;
    std::fs::rename(&part, &image_path).map_err(io(&image_path))?;
    std::fs::remove_file(&state_path).map_err(io(&state_path))?;
    Ok(Pulled { manifest, image_path, manifest_path, blocks_fetched: fetched, blocks_resumed })
}

/// The blocks an earlier pull of the same snapshot fetched and that still hold what it
/// recorded; any other state starts afresh.
fn resumable(state_path: &Path, snap: &Snapshot, file: &File) -> Result<BTreeMap<u64, String>, PullError> {
    let mut done = BTreeMap::new();
    let Ok(f) = File::open(state_path) else { return Ok(done) };
    let mut lines = std::io::BufReader::new(f).lines();
    if lines.next().and_then(Result::ok).as_deref() != Some(snap.snapshot_id.as_str()) {
        return Ok(done);
    }
    let mut buf = vec![0u8; snap.block_size as usize];
    for line in lines.map_while(Result::ok) {
        let Some((i, digest)) = line.split_once(' ') else { continue };
        let Ok(index) = i.parse::<u64>() else { continue };
        if !snap.blocks.contains_key(&index) {
            continue;
        }
        if file.read_exact_at(&mut buf, index * snap.block_size).is_ok() && hex::encode(Sha256::digest(&buf)) == digest
        {
            done.insert(index, digest.to_string());
        }
    }
    Ok(done)
}

/// How much of the volume is the disk that was written: a snapshot's volume is whole GiB, an
/// image need not be. A GPT says where the disk ended (its backup header's LBA); when no data
/// block lies past that, the image ends there. Anything else keeps the whole volume.
fn disk_extent(file: &File, snap: &Snapshot) -> std::io::Result<u64> {
    let mut hdr = [0u8; 92];
    file.read_exact_at(&mut hdr, 512)?;
    if &hdr[..8] != b"EFI PART" {
        return Ok(snap.volume_bytes);
    }
    let backup_lba = u64::from_le_bytes(hdr[32..40].try_into().expect("8 bytes"));
    let Some(end) = backup_lba.checked_add(1).and_then(|n| n.checked_mul(512)) else { return Ok(snap.volume_bytes) };
    let last_data = snap.blocks.keys().next_back().map_or(0, |i| (i + 1) * snap.block_size);
    if end > snap.volume_bytes || end + snap.block_size < last_data || end < 2048 {
        return Ok(snap.volume_bytes);
    }
    // The block holding the backup header may run past it: those bytes must be zeros.
    let mut tail = vec![0u8; (last_data.saturating_sub(end)) as usize];
    file.read_exact_at(&mut tail, end)?;
    Ok(if tail.iter().all(|&b| b == 0) { end } else { snap.volume_bytes })
}
