//! `kiln prune`: retention for the AMIs of one image.

use std::path::PathBuf;

use anyhow::Context as _;
use kiln::platform::Arch;
use kiln::publish::{self, PublishOptions};

/// Keep the newest AMIs of an image and retire the older ones nothing uses any more.
///
/// The image is named by its recipe (with --arch, as `kiln build --arch` would build it) or
/// its build manifest: its AMIs are those kiln tagged `kiln:name=NAME-ARCH` when it
/// registered or copied them, so an AMI kiln did not make is never touched, whatever its
/// name. In each region of [ami] regions (or --region), the newest N by creation date stay
/// (N is [ami] keep, or --keep).
///
/// An older AMI stays, and the report says why, when:
///   - a launch template, SSM parameter, instance or Image Builder recipe refers to it
///     (DescribeImageReferences);
///   - it was launched within [ami] keep_if_launched_within ("30d");
///   - it has deregistration protection ([ami] protect); --unprotect removes it first.
///
/// The others are deregistered, and their snapshots deleted unless another AMI of the account
/// still uses them. With [ami] disable_before_delete ("7d") they are disabled first
/// (DisableImage, undone with EnableImage) and deregistered by a prune after the grace period.
/// `kiln publish` does the same after each publish when the recipe sets `keep`.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    after_help = "Examples:\n  \
kiln prune --dry-run recipes/debian-12-ec2.toml          # what would go, changing nothing\n  \
kiln prune recipes/debian-12-ec2.toml --keep 3\n  \
kiln prune out/debian-12-ec2-arm64.manifest.json --region eu-west-1"
)]
pub struct Args {
    /// The image's recipe (RECIPE.toml) or build manifest (NAME.manifest.json).
    pub target: PathBuf,
    /// With a recipe: the architecture the AMIs were built for, instead of the recipe's.
    #[arg(long)]
    pub arch: Option<Arch>,
    /// How many of the newest AMIs to keep in each region [default: [ami] keep].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub keep: Option<u32>,
    /// Prune in this region instead of [ami] regions; repeatable.
    #[arg(long = "region", value_name = "REGION")]
    pub regions: Vec<String>,
    /// Only list what would be deregistered and deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove deregistration protection from the older AMIs that would otherwise go (one with
    /// a 24-hour cooldown goes on a prune a day later).
    #[arg(long)]
    pub unprotect: bool,
    /// Send requests here instead of AWS (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Print what was (or would be) removed and kept as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let is_manifest = a.target.extension().is_some_and(|e| e == "json");
    let (family, ami): (String, Option<kiln::manifest::AmiSettings>) = if is_manifest {
        let m = kiln::manifest::Manifest::load(&a.target)?;
        (m.name.clone(), m.ami)
    } else {
        let r = kiln::recipe::load(&a.target)?;
        let r = match a.arch {
            Some(arch) => r.with_arch(arch)?,
            None => r,
        };
        (r.output_name(), r.ami)
    };
    let keep = a.keep.or(ami.as_ref().and_then(|s| s.keep)).with_context(|| {
        format!(
            "{}: how many AMIs to keep? Set `keep` in the recipe's [ami] section or pass --keep N",
            a.target.display()
        )
    })?;
    let retire = ami
        .as_ref()
        .map(|s| publish::prune::Retire::from_settings(s, a.unprotect))
        .unwrap_or(publish::prune::Retire { unprotect: a.unprotect, ..Default::default() });
    let regions = if a.regions.is_empty() { ami.map(|s| s.regions).unwrap_or_default() } else { a.regions };
    anyhow::ensure!(
        !regions.is_empty(),
        "no region to prune in: set `regions` in the recipe's [ami] section or pass --region"
    );
    let opts = PublishOptions { endpoint_url: a.endpoint_url, dry_run: a.dry_run, ..PublishOptions::default() };
    let done = publish::prune::run(&family, keep as usize, &regions, &retire, &opts)
        .with_context(|| format!("pruning the AMIs of {family}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
        return Ok(());
    }
    let verb = if a.dry_run { "would deregister" } else { "deregistered" };
    for r in &done {
        println!("{}: keeping {} AMI(s) of {family}", r.region, r.kept.len());
        for k in &r.kept {
            println!("  keep        {}  {}  {}", k.image_id, k.creation_date, k.name);
        }
        for st in &r.stayed {
            println!("  stays       {}  {}  {}: {}", st.ami.image_id, st.ami.creation_date, st.ami.name, st.why);
        }
        for id in &r.unprotected {
            println!("  {} protection of {id}", if a.dry_run { "would remove" } else { "removed" });
        }
        for d in &r.disabled {
            println!(
                "  {}  {}  {}  {}",
                if a.dry_run { "would disable" } else { "disabled" },
                d.image_id,
                d.creation_date,
                d.name
            );
        }
        for d in &r.deregistered {
            println!("  {verb}  {}  {}  {}", d.image_id, d.creation_date, d.name);
        }
        for s in &r.snapshots_deleted {
            println!("  {} snapshot {s}", if a.dry_run { "would delete" } else { "deleted" });
        }
        for s in &r.snapshots_kept {
            println!("  kept snapshot {s} (another AMI uses it)");
        }
    }
    Ok(())
}
