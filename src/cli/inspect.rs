//! `kiln inspect`: the partition table and a summary of each file system, of an image file or
//! of an AMI or snapshot read where it is.

use std::sync::Arc;

use anyhow::{Context, Result};
use kiln::formats::device::{Device, FileDevice};
use kiln::remote::SnapshotId;
use serde_json::json;

/// Show an image's partition table and file systems, and audit what it carries.
///
/// The image is a raw disk file, or an AMI or EBS snapshot id (`ami-…`, `snap-…`): then its
/// root snapshot is read where it is, through the EBS direct APIs, fetching only the 512 KiB
/// blocks the readers touch (kept in a bounded cache, --cache-mib), never the whole volume.
/// The blocks and bytes read are reported.
///
/// Reads the partition table (GPT, else MBR, else a file system on the whole disk), then
/// summarises each file system: FAT (label, volume id, boot files) and ext2/ext3/ext4 (label,
/// UUID, size, free space, inodes, features). XFS, LVM, Btrfs, LUKS and swap are named, not
/// read.
///
/// With --audit, reads every ext2/3/4 file system back (no mount, nothing written) and reports
/// what a golden image must not carry, as `kiln build` does at the end of every build: private
/// keys, SSH host keys, a non-empty machine-id, random seeds, the build host's resolv.conf or
/// hostname, world-writable files outside temporary directories, setuid files no package
/// ships. Exits 1 when anything is found, so a pipeline can refuse an image built elsewhere.
///
/// Examples:
///   kiln inspect out/debian-12-minimal-x86_64.raw
///   kiln inspect out/debian-12-minimal-x86_64.raw --json | jq '.partitions[].type'
///   kiln inspect --audit vendor-image.raw --allow /etc/ssl/private/shipped.key
///   kiln inspect --audit ami-0123456789abcdef0 --region eu-west-1
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The raw disk image, or an AMI or snapshot id (ami-…, snap-…).
    pub image: String,
    #[command(flatten)]
    pub remote: super::RemoteArgs,
    /// With an AMI or snapshot id: memory for fetched blocks, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub cache_mib: u64,
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
    dev: &Arc<dyn Device>,
    offset: u64,
    allow: &std::collections::BTreeSet<String>,
) -> serde_json::Value {
    match kiln::formats::ext4::read::read_tree_from(dev.clone(), offset) {
        Ok(tree) => {
            let findings = kiln::stage::audit::audit(&tree, allow);
            json!({ "files": tree.live_inodes().count(), "findings": findings })
        }
        Err(e) => json!({ "error": kiln::message::render_error(&e) }),
    }
}

/// What was read from a snapshot, for the report.
type Stats = Box<dyn Fn() -> serde_json::Value>;

/// The disk `name` names: an image file, or a snapshot read block by block.
fn open(args: &Args) -> Result<(Arc<dyn Device>, Option<Stats>)> {
    let Some(id) = SnapshotId::parse(&args.image) else {
        return Ok((FileDevice::open(std::path::Path::new(&args.image))?, None));
    };
    let remote = args.remote.connect()?;
    let dev = kiln::remote::open(remote, &id, args.cache_mib << 20)
        .with_context(|| format!("opening {} through the EBS direct APIs", args.image))?;
    let stats_dev = dev.clone();
    let stats: Stats = Box::new(move || {
        let s = stats_dev.stats();
        let snap = stats_dev.fetcher().snapshot();
        json!({
            "snapshot_id": snap.snapshot_id,
            "blocks_fetched": s.blocks_fetched,
            "bytes_fetched": s.bytes_fetched,
            "cache_hits": s.cache_hits,
            "data_blocks": snap.blocks.len(),
            "volume_blocks": snap.volume_bytes / snap.block_size,
        })
    });
    Ok((dev, Some(stats)))
}

pub fn run(args: Args) -> Result<()> {
    let (dev, stats) = open(&args)?;
    let disk = kiln::formats::inspect::read_device(dev.clone())
        .with_context(|| format!("{}: no partition table or file system kiln reads", args.image))?;
    let allow: std::collections::BTreeSet<String> = args.allow.iter().cloned().collect();
    let size = disk.size_bytes;
    let boot_code = disk.mbr_boot_code;
    let mut v = serde_json::to_value(&disk)?;
    v.as_object_mut().expect("object").insert("image".into(), json!(args.image));
    if args.audit {
        for (p, pv) in disk.partitions.iter().zip(v["partitions"].as_array_mut().expect("array")) {
            use kiln::formats::inspect::FileSystem::{Ext4, Ext4Unreadable};
            if let (Some(Ext4(_) | Ext4Unreadable { .. }), Some(offset)) = (&p.filesystem, p.offset_bytes) {
                pv["filesystem"]["audit"] = audit_partition(&dev, offset, &allow);
            }
        }
    }
    if let Some(stats) = &stats {
        v.as_object_mut().expect("object").insert("read".into(), stats());
    }
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
            let unsupported: Vec<String> = disk
                .partitions
                .iter()
                .filter_map(|p| match p.filesystem {
                    Some(kiln::formats::inspect::FileSystem::Unsupported { kind }) => {
                        Some(format!("partition {} is {kind}", p.number))
                    }
                    _ => None,
                })
                .collect();
            anyhow::bail!(
                "--audit: {} has no ext2/ext3/ext4 file system to audit{}",
                args.image,
                if unsupported.is_empty() {
                    String::new()
                } else {
                    format!(" ({}, which kiln recognises but does not read)", unsupported.join(", "))
                }
            );
        }
        if found + unreadable > 0 {
            anyhow::bail!(
                "audit: {found} finding(s){} in {}; a path shipped on purpose can be passed with --allow PATH",
                if unreadable > 0 { format!(", {unreadable} file system(s) unreadable") } else { String::new() },
                args.image
            );
        }
        Ok(())
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return verdict();
    }
    let table = match disk.table {
        "gpt" => format!("GPT disk {}", disk.disk_guid),
        "mbr" => format!("MBR disk {}", disk.disk_guid),
        _ => "no partition table".into(),
    };
    println!("{}: {}, {table}", args.image, kiln::build::human_bytes(size));
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
                println!("    ext4, unreadable: {}", kiln::message::escape(fs["error"].as_str().unwrap_or("")))
            }
            Some("ext4") => println!(
                "    {} {:?} UUID {}: {} blocks of {} ({} free), {} inodes ({} free), features: {}",
                fs["version"].as_str().unwrap_or("ext4"),
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
            Some("unsupported") => {
                println!(
                    "    {}: recognised, not read (kiln reads ext2/ext3/ext4 and FAT)",
                    fs["kind"].as_str().unwrap_or("")
                )
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
    if let Some(r) = v.get("read") {
        println!(
            "read through EBS: {} of {} data blocks ({}) of {} for a {}-block volume",
            r["blocks_fetched"],
            r["data_blocks"],
            kiln::build::human_bytes(r["bytes_fetched"].as_u64().unwrap_or(0)),
            r["snapshot_id"].as_str().unwrap_or(""),
            r["volume_blocks"]
        );
    }
    verdict()
}
