//! `kiln promote` and `kiln rollback`: the SSM pointers consumers launch from.

use std::path::PathBuf;

use anyhow::Context as _;
use kiln::publish::{self, PublishOptions};

/// Move the recipe's SSM pointers ([ami.ssm] promote) to a published build's AMI.
///
/// A publish never moves the pointers consumers launch from (`/golden/{name}/{arch}/latest`);
/// promote does, in every region of the recipe (or --region), once it has checked, before
/// writing anything, that the build's AMI exists there, is available and carries the image's
/// SHA-256, and (with --require-test) that `kiln test` of the same image passed, as its
/// manifest records. A pointer that names a newer build of the image is refused unless
/// --force. Each write is described (`kiln promote AMI-NAME`) in the parameter's history, which
/// `kiln rollback` reads.
///
/// Examples:
///   kiln promote out/debian-12-ec2-x86_64.publish.json
///   kiln promote out/debian-12-ec2-x86_64.manifest.json --require-test --json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PromoteArgs {
    /// The build's manifest (NAME.manifest.json) or publish record (NAME.publish.json).
    pub target: PathBuf,
    /// Refuse unless the manifest records a passed `kiln test` (`kiln build --test`).
    #[arg(long)]
    pub require_test: bool,
    /// Move a pointer that names a newer build of the image back to this one.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub common: Common,
}

/// Move the recipe's SSM pointers back to what they named before the last promotion.
///
/// The previous value comes from each parameter's own history (GetParameterHistory), so any
/// runner can roll back with nothing but the manifest; rolling back twice goes back two
/// promotions. Refused, with nothing written, when a pointer has no earlier promotion or its
/// earlier AMI is no longer available.
///
/// Examples:
///   kiln rollback out/debian-12-ec2-x86_64.manifest.json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct RollbackArgs {
    /// Any build's manifest (NAME.manifest.json) of the image: it names the pointers.
    pub target: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Only this region instead of [ami] regions; repeatable.
    #[arg(long = "region", value_name = "REGION")]
    pub regions: Vec<String>,
    /// Send requests here instead of AWS (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Print the pointers' moves as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn options(c: &Common, force: bool) -> PublishOptions {
    PublishOptions {
        endpoint_url: c.endpoint_url.clone(),
        regions: c.regions.clone(),
        force,
        ..PublishOptions::default()
    }
}

fn print(moves: &[publish::promote::Move], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(moves)?);
        return Ok(());
    }
    for m in moves {
        let from = m.from.as_deref().unwrap_or("(unset)");
        if m.written {
            println!("{}  {}: {from} -> {}", m.region, m.name, m.to);
        } else {
            println!("{}  {}: already {}", m.region, m.name, m.to);
        }
    }
    Ok(())
}

pub fn promote(a: PromoteArgs) -> anyhow::Result<()> {
    let moves = publish::promote::promote_sync(&a.target, &options(&a.common, a.force), a.require_test)
        .with_context(|| format!("promoting {}", a.target.display()))?;
    print(&moves, a.common.json)
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let moves = publish::promote::rollback_sync(&a.target, &options(&a.common, false))
        .with_context(|| format!("rolling back the pointers of {}", a.target.display()))?;
    print(&moves, a.common.json)
}
