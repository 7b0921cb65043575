//! `kiln mkfs`: a rootless `mke2fs -d` that reads a tarball directly.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::formats::ext4::{self, Ext4Options, SizeSpec};
use kiln::formats::image::{Sink, SparseFile};
use kiln::formats::tar::{read_tar, TarOptions};
use kiln::formats::tree::Timestamp;

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
    /// File system size: bytes with a unit (512MiB, 2GiB, 1.5G) or `auto`.
    #[arg(long, default_value = "auto", value_parser = parse_size)]
    pub size: SizeArg,
    /// Volume label (at most 16 bytes).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Seed for the UUID and directory hash seed.
    #[arg(long, default_value = "kiln")]
    pub seed: String,
}

#[derive(Debug, Clone, Copy)]
pub enum SizeArg {
    Auto,
    Bytes(u64),
}

pub fn parse_size(s: &str) -> Result<SizeArg, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(SizeArg::Auto);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size; write it like 512MiB, 2GiB or auto"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => return Err(format!("unknown unit {u:?} in {s:?}; use KiB, MiB, GiB or TiB")),
    };
    Ok(SizeArg::Bytes((n * mult as f64) as u64))
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
        SizeArg::Auto => SizeSpec::Auto { headroom_percent: 20, min_free_bytes: 64 << 20 },
        SizeArg::Bytes(b) => SizeSpec::Bytes(b),
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
