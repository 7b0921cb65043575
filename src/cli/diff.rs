//! `kiln diff`: what changed between two builds.

use std::path::PathBuf;

use anyhow::Result;

/// Show what changed between two images: packages, files, and the blocks an upload sends.
///
/// A and B are images kiln built (NAME.raw, or NAME.manifest.json beside it). Packages come
/// from the manifests: added, removed, or at another version. Files come from the two root
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
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The earlier image (or its manifest).
    pub a: PathBuf,
    /// The later image (or its manifest).
    pub b: PathBuf,
    /// Print JSON (the changes, both images' SHA-256 and the block count).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let d = match kiln::diff::diff(&args.a, &args.b) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kiln: error: {}", kiln::message::render(anyhow::Error::from(e).chain()));
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
