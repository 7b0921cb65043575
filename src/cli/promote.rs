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
/// An AMI id promotes that build of the image (an older one, to pin it: with --force), with
/// --manifest naming any build manifest of the same image for the pointers and regions; its
/// copies in the other regions are found by name and image SHA-256.
///
/// Examples:
///   kiln promote out/debian-12-ec2-x86_64.publish.json
///   kiln promote out/debian-12-ec2-x86_64.manifest.json --require-test --json
///   kiln promote ami-0123456789abcdef0 --manifest out/debian-12-ec2-x86_64.manifest.json --force
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PromoteArgs {
    /// The build's manifest (NAME.manifest.json) or publish record (NAME.publish.json), or an
    /// AMI id (ami-…) with --manifest.
    pub target: String,
    /// With an AMI id: a build manifest of the same image (it names the pointers and regions).
    #[arg(long, value_name = "NAME.manifest.json")]
    pub manifest: Option<PathBuf>,
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
    let target = match (kiln::remote::SnapshotId::parse(&a.target), &a.manifest) {
        (Some(kiln::remote::SnapshotId::Image(image_id)), Some(m)) => {
            publish::promote::Target::Ami { image_id, manifest: m.clone() }
        }
        (Some(kiln::remote::SnapshotId::Image(_)), None) => anyhow::bail!(
            "promoting {} needs --manifest NAME.manifest.json: a build manifest of the same image names the pointers and regions",
            a.target
        ),
        (Some(kiln::remote::SnapshotId::Snapshot(_)), _) => {
            anyhow::bail!("{} is a snapshot; promote a build (its manifest) or an AMI", a.target)
        }
        (None, _) => publish::promote::Target::Build(PathBuf::from(&a.target)),
    };
    let moves = publish::promote::promote_sync(&target, &options(&a.common, a.force), a.require_test)
        .with_context(|| format!("promoting {}", a.target))?;
    print(&moves, a.common.json)
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let moves = publish::promote::rollback_sync(&a.target, &options(&a.common, false))
        .with_context(|| format!("rolling back the pointers of {}", a.target.display()))?;
    print(&moves, a.common.json)
}
