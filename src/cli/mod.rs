//! Command-line interface: one module per subcommand.

use clap::{Parser, Subcommand};

mod boot;
mod build;
mod bundle;
mod check;
mod diff;
mod inspect;
mod mkfs;
mod plan;
pub mod progress;
mod promote;
mod prune;
mod publish;
mod pull;
mod test;
mod unbundle;

/// kiln bakes golden machine images: a TOML recipe becomes a partitioned, bootable raw disk
/// (GPT, FAT32 ESP, ext4 root) written entirely in userspace, then an EBS snapshot and AMI or
/// an instance-store bundle. No build instance, no loop devices, no mounts.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Start with `kiln build recipes/debian-12-ec2.toml`, then `kiln test out/<name>.raw`, then `kiln publish out/<name>.manifest.json`.\n\
Every subcommand has its own --help with examples."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Build(build::Args),
    Check(check::Args),
    Inspect(inspect::Args),
    Diff(diff::Args),
    Boot(boot::Args),
    Test(test::Args),
    Mkfs(mkfs::Args),
    Plan(plan::Args),
    Publish(publish::Args),
    Pull(pull::Args),
    Prune(prune::Args),
    Promote(promote::PromoteArgs),
    Rollback(promote::RollbackArgs),
    Bundle(bundle::Args),
    Unbundle(unbundle::Args),
    /// Internal: QEMU runs this for each guest connection to the metadata service.
    #[command(hide = true)]
    ImdsRelay(test::RelayArgs),
}

/// Where an AMI or snapshot named by id is read from (`kiln inspect`, `pull`, `diff`).
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// With an AMI or snapshot id: its region [default: the AWS configuration's].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Send requests here instead of AWS (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
}

impl RemoteArgs {
    pub fn connect(&self) -> anyhow::Result<std::sync::Arc<kiln::remote::Remote>> {
        Ok(std::sync::Arc::new(kiln::remote::Remote::connect(self.region.clone(), self.endpoint_url.clone())?))
    }
}

/// A command's verdict as its exit status, with nothing more to print (`kiln diff`: 1 when
/// the images differ, 2 when they cannot be compared, its message already printed).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// A table as lines, header first: each column as wide as its widest cell (counted in
/// characters), the columns in `right` right-aligned (numbers), two spaces between columns.
pub fn table(header: &[&str], right: &[usize], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right.contains(&i) {
                out.push_str(&pad);
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < cells.len() {
                    out.push_str(&pad);
                }
            }
        }
        out
    };
    let mut lines = vec![line(header.to_vec())];
    lines.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    lines
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(a) => build::run(a),
        Command::Check(a) => check::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Diff(a) => diff::run(a),
        Command::Boot(a) => boot::run(a),
        Command::Test(a) => test::run(a),
        Command::Mkfs(a) => mkfs::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Promote(a) => promote::promote(a),
        Command::Rollback(a) => promote::rollback(a),
        Command::Bundle(a) => bundle::run(a),
        Command::Unbundle(a) => unbundle::run(a),
        Command::ImdsRelay(a) => test::relay(a),
    }
}
