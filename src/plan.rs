//! `kiln plan`: one job per recipe and architecture, with what a CI matrix needs to fan out and
//! to skip what is current: the job's key, its outputs, where its base is (local cache, shared
//! cache, or to be staged), and whether its image is already built and published for the
//! archive as it is now. Nothing is staged, built or uploaded.

use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::{BasePlan, BuildError, BuildOptions};
use crate::manifest::{BaseInfo, Manifest};
use crate::outputs::Outputs;
use crate::platform::Arch;
use crate::progress::Progress;
use crate::publish::history;
use crate::recipe::Recipe;
use crate::stage::debian::{self, Origin};

/// Where published images are remembered, for "already published".
#[derive(Debug, Clone, Default)]
pub struct PublishState {
    pub state_dir: Option<PathBuf>,
    pub state_url: Option<crate::share::ShareUrl>,
    pub endpoint_url: Option<String>,
}

/// One recipe × architecture.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub recipe: PathBuf,
    pub arch: Arch,
    /// The outputs' name (`NAME-ARCH`).
    pub name: String,
    /// SHA-256 over everything that decides the image: kiln's version, the recipe and what it
    /// pulls in, the architecture, the archive's and the recipe repositories' state, the epoch.
    /// The same before and after the job runs.
    pub key: String,
    pub base: BaseState,
    pub manifest: PathBuf,
    pub image: PathBuf,
    /// The outputs hold an image built from exactly these inputs.
    pub built: bool,
    /// That image is the last one published under its name (None: the recipe has no [ami]).
    pub published: Option<bool>,
    /// Nothing to do: built, and published when the recipe publishes.
    pub skip: bool,
    /// Why the job is (or is not) current, in a sentence.
    pub why: String,
}

/// Where the job's base is.
#[derive(Debug, Clone, Serialize)]
pub struct BaseState {
    /// `cached` (the local cache), `shared` (another runner staged it), `stage` (mmdebstrap
    /// will run), `tarball` (the recipe's own root).
    pub status: &'static str,
    /// The base's key for the archive as it is now (None for a tarball).
    pub key: Option<String>,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{recipe}")]
    Base { recipe: PathBuf, source: Box<BuildError> },
    #[error("{recipe}: the staged base")]
    Stage { recipe: PathBuf, source: Box<debian::StageError> },
    #[error("the shared cache")]
    Share(#[source] Box<BuildError>),
}

/// The jobs for these recipes (each already set to its architecture).
pub fn plan(
    recipes: &[Recipe],
    opts: &BuildOptions,
    publish: &PublishState,
    progress: &dyn Progress,
) -> Result<Vec<Job>, PlanError> {
    let shared = crate::build::shared_bases(opts).map_err(|e| PlanError::Share(Box::new(e)))?;
    let shared = shared.as_ref().map(|s| s as &dyn debian::SharedBases);
    recipes.iter().map(|r| job(r, opts, shared, publish, progress)).collect()
}

fn job(
    recipe: &Recipe,
    opts: &BuildOptions,
    shared: Option<&dyn debian::SharedBases>,
    publish: &PublishState,
    progress: &dyn Progress,
) -> Result<Job, PlanError> {
    let name = recipe.output_name();
    progress.note(&format!("planning {name}"));
    let plan = crate::build::plan_base(recipe, opts, progress)
        .map_err(|e| PlanError::Base { recipe: recipe.path.clone(), source: Box::new(e) })?;
    let (base, info, repositories) = match &plan {
        BasePlan::Tarball(_) => {
            (BaseState { status: "tarball", key: None, why: "the recipe's own root tarball".into() }, None, Vec::new())
        }
        BasePlan::Debian { base, layer, .. } => {
            let lookup_opts = debian::StageOptions {
                freshness: debian::Freshness::Online,
                cache_dir: &opts.cache_dir,
                shared,
                reuse_resolved: layer.is_none(),
            };
            let found = debian::lookup(base, lookup_opts)
                .map_err(|e| PlanError::Stage { recipe: recipe.path.clone(), source: Box::new(e) })?;
            let repos = layer.as_ref().map(|l| l.repository_states()).unwrap_or_default();
            match found.found {
                Ok((info, origin)) => {
                    let status = if matches!(origin, Origin::Shared(_)) { "shared" } else { "cached" };
                    (BaseState { status, key: Some(found.key), why: origin.why().to_string() }, Some(info), repos)
                }
                Err(why) => (BaseState { status: "stage", key: Some(found.key), why }, None, repos),
            }
        }
    };
    let mut h = Sha256::new();
    for part in [
        "kiln-job-v1",
        env!("CARGO_PKG_VERSION"),
        &recipe.sha256,
        recipe.arch.debian(),
        base.key.as_deref().unwrap_or(""),
        &serde_json::to_string(&repositories).unwrap_or_default(),
        &format!("{:?}", opts.source_date_epoch.or(recipe.source_date_epoch)),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let outputs = Outputs::new(&opts.out_dir, &name);
    let built = Manifest::load(&outputs.manifest()).ok().filter(|m| {
        let image_whole = std::fs::metadata(outputs.image()).is_ok_and(|md| md.len() == m.image.size_bytes);
        let base_same = match (&info, &m.base) {
            (Some(now), Some(then)) => same_base(now, then),
            (None, None) => matches!(plan, BasePlan::Tarball(_)),
            _ => false,
        };
        image_whole
            && base_same
            && m.kiln_version == env!("CARGO_PKG_VERSION")
            && m.recipe.sha256 == recipe.sha256
            && m.arch == recipe.arch
            && m.layer.as_ref().map(|l| l.repositories.clone()).unwrap_or_default() == repositories
            && opts.source_date_epoch.or(recipe.source_date_epoch).is_none_or(|e| e == m.source_date_epoch)
    });
    let published = match (&recipe.ami, &built) {
        (None, _) => None,
        (Some(_), None) => Some(false),
        (Some(ami), Some(m)) => Some(is_published(m, ami.regions.first().map(String::as_str), publish)),
    };
    let why = match (&built, published) {
        (None, _) if base.status == "stage" => format!("to build: {}", base.why),
        (None, _) => "to build: the outputs are not those of these inputs".to_string(),
        (Some(_), Some(false)) => "built from these inputs; not yet the last published image".to_string(),
        (Some(_), _) => "current: built from these inputs and published where the recipe publishes".to_string(),
    };
    Ok(Job {
        recipe: recipe.path.clone(),
        arch: recipe.arch,
        name,
        key: hex::encode(h.finalize()),
        base,
        manifest: outputs.manifest(),
        image: outputs.image(),
        skip: built.is_some() && published != Some(false),
        built: built.is_some(),
        published,
        why,
    })
}

/// The base a build would use is the one the image was built on: the same staging (a base
/// reused at a re-signed state keeps the record of its staging).
fn same_base(now: &BaseInfo, then: &BaseInfo) -> bool {
    now.cache_key == then.cache_key && now.staged_at == then.staged_at
}

/// Whether the last publish remembered for this image name is this image. A history that
/// cannot be read counts as not published: the job runs, and its publish says why it failed.
fn is_published(m: &Manifest, region: Option<&str>, state: &PublishState) -> bool {
    let Some(region) = region else { return false };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
    let recalled = rt.block_on(async {
        let shared = match &state.state_url {
            Some(url) => Some((
                crate::share::Store::connect(url.clone()).await,
                history::relative(state.endpoint_url.as_deref(), region, &m.name),
            )),
            None => None,
        };
        let local =
            state.state_dir.as_deref().map(|d| history::path(d, state.endpoint_url.as_deref(), region, &m.name));
        history::Place { local, shared }.recall().await.ok()
    });
    recalled.and_then(|r| r.published).is_some_and(|p| p.manifest.image.sha256 == m.image.sha256)
}
