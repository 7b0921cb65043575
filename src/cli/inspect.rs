//! `kiln inspect`: the partition table and a summary of each file system.

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

pub fn run(args: Args) -> Result<()> {
    let disk = kiln::formats::inspect::read(&args.image)
        .with_context(|| format!("{} has no readable GPT", args.image.display()))?;
    let allow: std::collections::BTreeSet<String> = args.allow.iter().cloned().collect();
    let size = disk.size_bytes;
    let boot_code = disk.mbr_boot_code;
    let mut v = serde_json::to_value(&disk)?;
    v.as_object_mut().expect("object").insert("image".into(), json!(args.image));
    if args.audit {
        for (p, pv) in disk.partitions.iter().zip(v["partitions"].as_array_mut().expect("array")) {
            use kiln::formats::inspect::FileSystem::{Ext4, Ext4Unreadable};
            if let (Some(Ext4(_) | Ext4Unreadable { .. }), Some(offset)) = (&p.filesystem, p.offset_bytes) {
                pv["filesystem"]["audit"] = audit_partition(&args.image, offset, &allow);
            }
        }
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
                println!("    ext4, unreadable: {}", kiln::message::escape(fs["error"].as_str().unwrap_or("")))
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
