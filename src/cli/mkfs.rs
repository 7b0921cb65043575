//! `kiln mkfs`: a rootless `mke2fs -d` that reads a tarball directly.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::formats::ext4::{self, Ext4Options, SizeSpec};
use kiln::formats::image::{Sink, SparseFile};
use kiln::formats::tar::{read_tar, TarOptions};
use kiln::formats::tree::Timestamp;
use kiln::recipe::size::{self, DiskSize};

/// Make an ext4 file system from a root tarball, without root, mounts or loop devices.
///
/// Reads ROOT.tar (GNU, PAX or ustar: ownership, modes, nanosecond times, xattrs, hard links,
/// devices and sparse files are kept) and writes OUT.img as a sparse file. Identifiers derive
/// from --seed, and every timestamp is clamped to SOURCE_DATE_EPOCH when it is set, so the same
/// inputs give the same bytes.
///
/// Examples:
///   kiln mkfs rootfs.tar root.img                      # smallest size that fits, plus headroom
///   kiln mkfs rootfs.tar root.img --size 2GiB --label root --seed my-image
///   docker export c | gzip -d > c.tar && kiln mkfs c.tar c.img
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The root tarball.
    pub tar: PathBuf,
    /// The image to write (replaced atomically).
    pub out: PathBuf,
    /// File system size: an integer and a binary unit (512MiB, 2GiB) or `auto`.
    #[arg(long, default_value = "auto", value_parser = parse_size)]
    pub size: DiskSize,
    /// Volume label (at most 16 bytes).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Seed for the UUID and directory hash seed.
    #[arg(long, default_value = "kiln")]
    pub seed: String,
}

/// The same size syntax as recipes (binary units only, or `auto`), with the same messages.
fn parse_size(s: &str) -> Result<DiskSize, String> {
    size::parse_disk_size(s).map_err(|e| match e {
        size::SizeError::DecimalUnit { .. } => e.to_string(),
        _ => format!("{e}; write {} or auto", size::ACCEPTED),
    })
}

pub fn run(args: Args) -> Result<()> {
    let tree_started = std::time::Instant::now();
    let spool = args.out.parent().map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() });
    let mut tree = read_tar(&args.tar, &TarOptions { spool_dir: spool })
        .with_context(|| format!("reading {}", args.tar.display()))?;
    let epoch = super::build::source_date_epoch_from_env()?;
    if let Some(e) = epoch {
        tree.clamp_times(Timestamp::new(e, 0));
    }
    let mut opts = Ext4Options::with_seed(args.seed.as_bytes());
    opts.label = args.label.clone();
    opts.timestamp = epoch.unwrap_or(0);
    opts.size = match args.size {
        DiskSize::Auto => SizeSpec::Auto { headroom_percent: 20, min_free_bytes: 64 << 20 },
        DiskSize::Bytes(b) => SizeSpec::Bytes(b),
    };
    let plan = ext4::plan(&tree, &opts).context("planning the file system")?;
    let mut out = SparseFile::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    plan.write(&tree, &mut out).context("writing the file system")?;
    out.finish(plan.size_bytes())?;
    out.persist().with_context(|| format!("finishing {}", args.out.display()))?;
    eprintln!(
        "kiln: wrote {} ({}, {} inodes, UUID {}) in {:.2} s",
        args.out.display(),
        kiln::build::human_bytes(plan.size_bytes()),
        tree.live_inodes().count(),
        ext4::uuid_string(&plan.uuid()),
        tree_started.elapsed().as_secs_f64()
    );
    Ok(())
}
