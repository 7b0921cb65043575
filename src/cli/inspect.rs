//! `kiln inspect`: the partition table and a summary of each file system.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

/// Show an image's partition table and file systems, and audit what it carries.
///
/// Reads the GPT (protective MBR, BIOS boot partition included), then summarises each file
/// system: FAT (label, volume id, boot files) and ext4 (label, UUID, size, free space,
/// inodes, features).
///
/// With --audit, reads every ext4 file system back (no mount, nothing written) and reports
/// what a golden image must not carry, as `kiln build` does at the end of every build: private
/// keys, SSH host keys, a non-empty machine-id, random seeds, the build host's resolv.conf or
/// hostname, world-writable files outside temporary directories, setuid files no package
/// ships. Exits 1 when anything is found, so a pipeline can refuse an image built elsewhere.
///
/// Examples:
///   kiln inspect out/debian-12-minimal-x86_64.raw
///   kiln inspect out/debian-12-minimal-x86_64.raw --json | jq '.partitions[].type'
///   kiln inspect --audit vendor-image.raw --allow /etc/ssl/private/shipped.key
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The raw disk image.
    pub image: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Audit each ext4 file system for what a golden image must not carry; exit 1 on findings.
    #[arg(long)]
    pub audit: bool,
    /// With --audit: a path that is there on purpose (like a recipe's [audit] allow); repeatable.
    #[arg(long, value_name = "PATH", requires = "audit")]
    pub allow: Vec<String>,
}

/// The audit of one ext4 partition: its findings, or why it could not be read.
fn audit_partition(
    image: &std::path::Path,
    offset: u64,
    allow: &std::collections::BTreeSet<String>,
) -> serde_json::Value {
    match kiln::formats::ext4::read_tree(image, offset) {
        Ok(tree) => {
            let findings = kiln::stage::audit::audit(&tree, allow);
            json!({ "files": tree.live_inodes().count(), "findings": findings })
        }
        Err(e) => json!({ "error": kiln::message::render_error(&e) }),
    }
}

/// Summary of the ext4 file system at `offset`, or None when there is none.
fn ext4_summary(image: &std::path::Path, offset: u64) -> Option<serde_json::Value> {
    let sb = match kiln::formats::ext4::read::Superblock::read_at(image, offset) {
        Ok(Some(sb)) => sb,
        Ok(None) => return None,
        // A damaged superblock is something to show, not a reason to stop.
        Err(e) => return Some(json!({ "type": "ext4", "error": kiln::message::render_error(&e) })),
    };
    Some(json!({
        "type": "ext4",
        "label": sb.label,
        "uuid": kiln::formats::ext4::uuid_string(&sb.uuid),
        "block_size": sb.block_size,
        "blocks": sb.blocks,
        "free_blocks": sb.free_blocks,
        "inodes": sb.inodes,
        "free_inodes": sb.free_inodes,
        "features": sb.feature_names(),
    }))
}

fn fat_summary(path: &std::path::Path, offset: u64, size: u64) -> Option<serde_json::Value> {
    let f = std::fs::File::open(path).ok()?;
    let window = Window { f, start: offset, len: size, pos: 0 };
    let fs = fatfs::FileSystem::new(window, fatfs::FsOptions::new()).ok()?;
    let mut files = Vec::new();
    fn walk<T: fatfs::ReadWriteSeek>(dir: fatfs::Dir<T>, prefix: &str, out: &mut Vec<String>, depth: u32) {
        for e in dir.iter().flatten() {
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let p = format!("{prefix}/{name}");
            if e.is_dir() && depth < 4 {
                walk(e.to_dir(), &p, out, depth + 1);
            } else if !e.is_dir() {
                out.push(format!("{p} ({} bytes)", e.len()));
            }
        }
    }
    walk(fs.root_dir(), "", &mut files, 0);
    let id = fs.volume_id();
    Some(json!({
        "type": "vfat",
        "label": fs.volume_label().trim_end().to_string(),
        "volume_id": format!("{:04X}-{:04X}", id >> 16, id & 0xffff),
        "files": files,
    }))
}

/// A partition of the image file as a device of its own, for fatfs.
#[derive(Debug)]
struct Window {
    f: std::fs::File,
    start: u64,
    len: u64,
    pos: u64,
}
impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.f.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.f.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}
impl std::io::Write for Window {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("kiln inspect never writes"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Seek for Window {
    fn seek(&mut self, p: SeekFrom) -> std::io::Result<u64> {
        self.pos = match p {
            SeekFrom::Start(n) => n,
            SeekFrom::End(d) => (self.len as i64 + d) as u64,
            SeekFrom::Current(d) => (self.pos as i64 + d) as u64,
        };
        Ok(self.pos)
    }
}

pub fn run(args: Args) -> Result<()> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open(&args.image)
        .with_context(|| format!("{} has no readable GPT", args.image.display()))?;
    let mut f = std::fs::File::open(&args.image)?;
    let size = f.metadata()?.len();
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr)?;
    let boot_code = mbr[..440].iter().any(|&b| b != 0);
    let allow: std::collections::BTreeSet<String> = args.allow.iter().cloned().collect();
    let mut parts = Vec::new();
    for (n, p) in disk.partitions() {
        let t = p.part_type_guid.guid.hyphenated().to_string().to_uppercase();
        let offset = p.first_lba * 512;
        let psize = (p.last_lba - p.first_lba + 1) * 512;
        let fs = match ext4_summary(&args.image, offset) {
            Some(mut e) => {
                if args.audit {
                    e["audit"] = audit_partition(&args.image, offset, &allow);
                }
                e
            }
            None => fat_summary(&args.image, offset, psize).unwrap_or(json!(null)),
        };
        parts.push(json!({
            "number": n,
            "name": p.name,
            "type": kiln::formats::gpt::types::name(&t),
            "type_guid": t,
            "guid": p.part_guid.hyphenated().to_string().to_uppercase(),
            "first_lba": p.first_lba,
            "last_lba": p.last_lba,
            "size_bytes": psize,
            "filesystem": fs,
        }));
    }
    let v = json!({
        "image": args.image,
        "size_bytes": size,
        "disk_guid": disk.guid().hyphenated().to_string().to_uppercase(),
        "mbr_boot_code": boot_code,
        "partitions": parts,
    });
    // Audit verdict: findings, or a file system that could not be read, fail the command.
    let audits: Vec<(u64, &serde_json::Value)> = v["partitions"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| Some((p["number"].as_u64()?, p["filesystem"].get("audit")?)))
        .collect();
    let found: usize = audits.iter().map(|(_, a)| a["findings"].as_array().map_or(0, Vec::len)).sum();
    let unreadable = audits.iter().filter(|(_, a)| a.get("error").is_some()).count();
    let verdict = || -> Result<()> {
        if args.audit && audits.is_empty() {
            anyhow::bail!("--audit: {} has no ext4 file system to audit", args.image.display());
        }
        if found + unreadable > 0 {
            anyhow::bail!(
                "audit: {found} finding(s){} in {}; a path shipped on purpose can be passed with --allow PATH",
                if unreadable > 0 { format!(", {unreadable} file system(s) unreadable") } else { String::new() },
                args.image.display()
            );
        }
        Ok(())
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return verdict();
    }
    println!(
        "{}: {}, GPT disk {}",
        args.image.display(),
        kiln::build::human_bytes(size),
        v["disk_guid"].as_str().unwrap_or("")
    );
    println!("MBR boot code: {}", if boot_code { "present (legacy BIOS boot)" } else { "none (UEFI only)" });
    let rows: Vec<Vec<String>> = v["partitions"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            vec![
                p["number"].to_string(),
                p["name"].as_str().unwrap_or("").to_string(),
                p["type"].as_str().unwrap_or("").to_string(),
                p["first_lba"].to_string(),
                p["last_lba"].to_string(),
                kiln::build::human_bytes(p["size_bytes"].as_u64().unwrap_or(0)),
                p["guid"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    let lines = super::table(&["#", "name", "type", "start", "end", "size", "GUID"], &[0, 3, 4, 5], &rows);
    println!("{}", lines[0]);
    for (p, line) in v["partitions"].as_array().expect("array").iter().zip(&lines[1..]) {
        println!("{line}");
        let fs = &p["filesystem"];
        match fs["type"].as_str() {
            Some("ext4") if fs.get("error").is_some() => {
                println!("    ext4, unreadable: {}", fs["error"].as_str().unwrap_or(""))
            }
            Some("ext4") => println!(
                "    ext4 {:?} UUID {}: {} blocks of {} ({} free), {} inodes ({} free), features: {}",
                fs["label"].as_str().unwrap_or(""),
                fs["uuid"].as_str().unwrap_or(""),
                fs["blocks"],
                fs["block_size"],
                fs["free_blocks"],
                fs["inodes"],
                fs["free_inodes"],
                fs["features"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            ),
            Some("vfat") => {
                println!(
                    "    FAT32 {:?} volume id {}",
                    fs["label"].as_str().unwrap_or(""),
                    fs["volume_id"].as_str().unwrap_or("")
                );
                for file in fs["files"].as_array().into_iter().flatten() {
                    println!("      {}", file.as_str().unwrap_or(""));
                }
            }
            _ => {}
        }
        if let Some(a) = fs.get("audit") {
            if let Some(e) = a["error"].as_str() {
                println!("    audit: cannot read the file system: {e}");
            } else {
                let findings = a["findings"].as_array().cloned().unwrap_or_default();
                println!("    audit: {} file(s) read, {} finding(s)", a["files"], findings.len());
                for f in findings {
                    println!("      {}: {}", f["path"].as_str().unwrap_or(""), f["what"].as_str().unwrap_or(""));
                }
            }
        }
    }
    verdict()
}
