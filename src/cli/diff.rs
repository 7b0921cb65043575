//! `kiln diff`: what changed between two builds.

use std::path::PathBuf;

use anyhow::Result;

/// Show what changed between two images: packages, files, and the blocks an upload sends.
///
/// A and B are images kiln built (NAME.raw, or NAME.manifest.json beside it), images pulled
/// with `kiln pull` (NAME.raw beside NAME.pull.json), or AMI or snapshot ids (ami-…, snap-…),
/// which are pulled first into the cache (KILN_CACHE_DIR/pulled; kept, so the next diff against
/// the same AMI fetches nothing). Packages come from kiln's manifests, or from dpkg's status
/// file in the image: added, removed, or at another version. Files come from the two root
/// file systems, read back from the images (no mount): added, removed, or changed in kind,
/// mode, owner, content (SHA-256), link target or extended attributes. Blocks: the 512 KiB
/// EBS blocks an incremental `kiln publish` of B on A's snapshot would send.
///
/// Exits 0 when the images are the same, 1 when they differ, 2 when they cannot be compared,
/// as diff(1) does: a nightly pipeline can skip publishing an unchanged image.
///
/// Examples:
///   kiln diff last-night/debian-12-ec2-x86_64.raw out/debian-12-ec2-x86_64.raw
///   kiln diff a.manifest.json b.manifest.json --json | jq '.packages'
///   kiln diff ami-0123456789abcdef0 out/debian-12-ec2-x86_64.raw --region eu-west-1
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The earlier image (or its manifest, or an AMI or snapshot id).
    pub a: String,
    /// The later image (or its manifest, or an AMI or snapshot id).
    pub b: String,
    #[command(flatten)]
    pub remote: super::RemoteArgs,
    /// Print JSON (the changes, both images' SHA-256 and the block count).
    #[arg(long)]
    pub json: bool,
}

/// The image `arg` names: a path, or an AMI or snapshot pulled into the cache.
fn local(arg: &str, args: &Args) -> Result<PathBuf> {
    let Some(id) = kiln::remote::SnapshotId::parse(arg) else { return Ok(PathBuf::from(arg)) };
    let remote = args.remote.connect()?;
    let dir = kiln::build::default_cache_dir().join("pulled");
    let progress = super::progress::TermProgress::new(args.json);
    let pulled = kiln::pull::pull(remote, &id, &dir, 16, &progress)?;
    Ok(pulled.image_path)
}

pub fn run(args: Args) -> Result<()> {
    let sides = local(&args.a, &args).and_then(|a| Ok((a, local(&args.b, &args)?)));
    let d = match sides
        .map_err(|e| e.context("pulling an AMI to compare"))
        .and_then(|(a, b)| Ok(kiln::diff::diff(&a, &b)?))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kiln: error: {}", kiln::message::render(e.chain()));
            return Err(super::ExitWith(2).into());
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print_text(&d);
    }
    if d.differs() {
        return Err(super::ExitWith(1).into());
    }
    Ok(())
}

fn print_text(d: &kiln::diff::Diff) {
    println!("--- {} (sha256 {})", d.a, &d.a_sha256[..d.a_sha256.len().min(12)]);
    println!("+++ {} (sha256 {})", d.b, &d.b_sha256[..d.b_sha256.len().min(12)]);
    let count = |c: &str| d.packages.iter().filter(|p| kind(p) == c).count();
    println!("packages: {} added, {} removed, {} changed version", count("added"), count("removed"), count("changed"));
    for p in &d.packages {
        match (&p.from, &p.to) {
            (None, Some(v)) => println!("  + {} {v}", p.name),
            (Some(v), None) => println!("  - {} {v}", p.name),
            (Some(f), Some(t)) => println!("  ~ {} {f} -> {t}", p.name),
            (None, None) => {}
        }
    }
    let files = |c: &str| d.files.iter().filter(|f| f.change == c).count();
    println!("files: {} added, {} removed, {} changed", files("added"), files("removed"), files("changed"));
    for f in &d.files {
        let mark = match f.change {
            "added" => "+",
            "removed" => "-",
            _ => "~",
        };
        let what = if f.what.is_empty() { String::new() } else { format!(" ({})", f.what.join(", ")) };
        println!("  {mark} {}{what}", kiln::message::escape(&f.path));
    }
    println!(
        "blocks: {} of {} KiB an incremental publish of B on A sends ({})",
        d.blocks_changed,
        d.block_size / 1024,
        kiln::build::human_bytes(d.blocks_changed * d.block_size)
    );
}

fn kind(p: &kiln::diff::PackageChange) -> &'static str {
    match (&p.from, &p.to) {
        (None, _) => "added",
        (_, None) => "removed",
        _ => "changed",
    }
}
