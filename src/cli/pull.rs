//! `kiln pull`: an AMI's or snapshot's disk as a local sparse raw image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::remote::SnapshotId;

/// Bring an AMI's root snapshot (or any EBS snapshot) home as a sparse raw image.
///
/// Fetches only the 512 KiB blocks EBS lists as written (ListSnapshotBlocks, then
/// GetSnapshotBlock), checks each against the SHA-256 EBS sends with it, and writes
/// DIR/NAME.raw (sparse: unwritten blocks stay holes) and DIR/NAME.pull.json: the snapshot,
/// the image's size and SHA-256, and each data block's SHA-256 (the form of a build
/// manifest's `blocks`). NAME is the AMI or snapshot id.
///
/// A GPT disk ends where its backup header says, as the image that was uploaded did; when the
/// AMI carries kiln's `kiln:image-sha256` tag, the pulled image must match it.
///
/// Interrupted? Run the same command again: blocks already fetched (DIR/NAME.raw.part, listed
/// in DIR/NAME.pull-state) are checked and kept, and only the rest are fetched.
///
/// The image can then be tested (`kiln test`), inspected, compared (`kiln diff`) or published
/// to another account or region.
///
/// Examples:
///   kiln pull ami-0123456789abcdef0 --region eu-west-1 -o pulled/
///   kiln pull snap-0123456789abcdef0 --json | jq .manifest.image.sha256
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The AMI or snapshot id (ami-…, snap-…).
    pub id: String,
    /// Where to write NAME.raw and NAME.pull.json.
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = "out")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub remote: super::RemoteArgs,
    /// Blocks fetched at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub concurrency: u64,
    /// Print what was pulled as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let id =
        SnapshotId::parse(&a.id).with_context(|| format!("`{}` is not an AMI or snapshot id (ami-…, snap-…)", a.id))?;
    let remote = a.remote.connect()?;
    let progress = super::progress::TermProgress::new(a.json);
    let pulled = kiln::pull::pull(remote, &id, &a.dir, a.concurrency as usize, &progress)
        .with_context(|| format!("pulling {}", a.id))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&pulled)?);
        return Ok(());
    }
    let m = &pulled.manifest;
    eprintln!(
        "kiln: pulled {} ({}, sha256 {}): {} data blocks, {} fetched now, {} kept from an earlier pull{}\nkiln: manifest {}",
        pulled.image_path.display(),
        kiln::build::human_bytes(m.image.size_bytes),
        m.image.sha256,
        m.blocks.data_blocks.len(),
        pulled.blocks_fetched,
        pulled.blocks_resumed,
        if m.image.tagged_sha256.is_some() { "; matches the AMI's kiln:image-sha256 tag" } else { "" },
        pulled.manifest_path.display()
    );
    Ok(())
}
