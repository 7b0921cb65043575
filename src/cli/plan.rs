//! `kiln plan`: the jobs of a CI matrix, and which of them are already done.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::build::{self, BuildOptions};
use kiln::plan::{self, PublishState};
use kiln::platform::Arch;

use super::progress::TermProgress;

/// Plan a CI matrix: one job per recipe and architecture, and which are current.
///
/// For each job: its key (everything that decides the image), its outputs, where its staged
/// base is (`cached` here, `shared` by another runner through --cache-url, or `stage`), and
/// whether the outputs already hold the image of these inputs (`built`) and it is the last one
/// published under its name (`published`, read from the state directory or --state-url).
/// Jobs with `skip: true` have nothing to do. The archive and the recipe repositories are read
/// (their state decides the base); nothing is staged, built or uploaded.
///
/// Fan out in plain shell (each line of --pending is RECIPE ARCH):
///   kiln plan recipes/*.toml --arch x86_64 --arch arm64 --pending \
///     | xargs -P 4 -L 1 sh -c 'kiln build "$0" --arch "$1" --publish'
///
/// Or a GitHub Actions matrix from --json --pending (`include: ${{ fromJSON(…).jobs }}`);
/// see README.md.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The recipes (TOML).
    #[arg(required = true)]
    pub recipes: Vec<PathBuf>,
    /// Plan each recipe for these architectures (repeatable) instead of its own.
    #[arg(long)]
    pub arch: Vec<Arch>,
    /// Where the builds write their outputs (as `kiln build --out`).
    #[arg(long, short, default_value = "out")]
    pub out: PathBuf,
    /// Debian mirror URL, used when a recipe names none (default: the host's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Cache for staged bases [default: $KILN_CACHE_DIR, else ~/.cache/kiln].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Staged bases shared through S3 (see `kiln build --help`).
    #[arg(long, env = "KILN_CACHE_URL", value_name = "s3://BUCKET/PREFIX")]
    pub cache_url: Option<kiln::share::ShareUrl>,
    /// Where kiln remembers what it published [default: as `kiln publish`].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// What was published, shared through S3 (see `kiln publish --help`).
    #[arg(long, env = "KILN_STATE_URL", value_name = "s3://BUCKET/PREFIX")]
    pub state_url: Option<kiln::share::ShareUrl>,
    /// The endpoint publishing goes to (as `kiln publish --endpoint-url`).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Only the jobs with something to do: as `RECIPE ARCH` lines, or with --json as jobs.
    #[arg(long)]
    pub pending: bool,
    /// Print {"jobs": [...]} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let cache_dir = a.cache_dir.clone().unwrap_or_else(build::default_cache_dir);
    let mut recipes = Vec::new();
    for path in &a.recipes {
        let recipe = kiln::recipe::load_with(path, build::digest_cache(&cache_dir))?;
        if a.arch.is_empty() {
            recipes.push(recipe);
        } else {
            for arch in &a.arch {
                recipes.push(recipe.clone().with_arch(*arch)?);
            }
        }
    }
    let opts = BuildOptions {
        out_dir: a.out.clone(),
        cache_dir,
        mirror: a.mirror.clone(),
        apt_mirror: None,
        source_date_epoch: super::build::source_date_epoch_from_env()?,
        offline: false,
        cache_url: a.cache_url.clone(),
        sign_key: None,
    };
    let state = PublishState {
        state_dir: Some(a.state_dir.clone().unwrap_or_else(kiln::publish::history::default_state_dir)),
        state_url: a.state_url.clone(),
        endpoint_url: a.endpoint_url.clone(),
    };
    let progress = TermProgress::new(true);
    let mut jobs = plan::plan(&recipes, &opts, &state, &progress).context("planning")?;
    if a.pending {
        jobs.retain(|j| !j.skip);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "jobs": jobs }))?);
    } else if a.pending {
        for j in &jobs {
            println!("{} {}", j.recipe.display(), j.arch);
        }
    } else {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                vec![
                    j.name.clone(),
                    j.base.status.to_string(),
                    yes_no(j.built),
                    j.published.map_or("-".to_string(), yes_no),
                    j.why.clone(),
                ]
            })
            .collect();
        for line in super::table(&["JOB", "BASE", "BUILT", "PUBLISHED", "WHY"], &[], &rows) {
            println!("{line}");
        }
    }
    Ok(())
}
