//! One run from recipe to published image: build, then boot, test and publish the image just
//! built, each only when asked. The order is the policy: a failed test is recorded in the
//! manifest and stops the run before anything is published.

use std::path::{Path, PathBuf};

use crate::boot::{BootError, BootOptions, BootReport, Firmware};
use crate::build::{BuildError, BuildOptions, BuildOutput};
use crate::launch::request::{self, TestError, TestOutcome, TestRequest, TestTarget};
use crate::launch::TestOptions;
use crate::platform::BootMode;
use crate::progress::Progress;
use crate::publish::record::PublishRecord;
use crate::publish::{PublishError, PublishOptions};
use crate::recipe::Recipe;

/// What follows the build.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub build: BuildOptions,
    /// Boot the image under QEMU and wait for the login prompt.
    pub boot: bool,
    /// Launch it the way EC2 would and record the verdict in its manifest.
    pub test: Option<TestRequest>,
    /// Upload and register it (after a passing test, when there is one).
    pub publish: Option<PublishOptions>,
}

/// Each step as it completes (and the test as it starts), for the caller to report.
pub enum Step<'a> {
    Built(&'a BuildOutput),
    Booted(&'a BootReport),
    Testing {
        image: &'a Path,
        options: &'a TestOptions,
    },
    Tested(&'a TestOutcome),
    /// The record of what was published, and the file it was written to.
    Published {
        record: &'a PublishRecord,
        path: &'a Path,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("building {}", recipe.display())]
    Build { recipe: PathBuf, source: Box<BuildError> },
    #[error("booting {}", image.display())]
    Boot { image: PathBuf, source: BootError },
    #[error(transparent)]
    Test(#[from] TestError),
    #[error("{}: {} check(s) failed: {}", image.display(), failures.len(), failures.join(", "))]
    TestFailed { image: PathBuf, failures: Vec<String> },
    #[error("publishing {}", manifest.display())]
    Publish { manifest: PathBuf, source: PublishError },
}

/// Builds `recipe`, then boots, tests and publishes as `opts` asks; `on_step` hears of each
/// step. Returns the build's output, its manifest carrying the test's verdict.
pub fn run(
    recipe: &Recipe,
    opts: &PipelineOptions,
    progress: &dyn Progress,
    mut on_step: impl FnMut(Step<'_>),
) -> Result<BuildOutput, PipelineError> {
    let mut built = crate::build::build(recipe, &opts.build, progress)
        .map_err(|source| PipelineError::Build { recipe: recipe.path.clone(), source: Box::new(source) })?;
    on_step(Step::Built(&built));
    if opts.boot {
        let report = boot(&built, progress)?;
        on_step(Step::Booted(&report));
    }
    if let Some(req) = &opts.test {
        let outcome = test(&mut built, req, progress, &mut on_step)?;
        if !outcome.report.passed {
            return Err(PipelineError::TestFailed { image: built.image_path, failures: outcome.report.failures() });
        }
    }
    if let Some(publish) = &opts.publish {
        let record = crate::publish::publish(&built.manifest_path, publish, progress)
            .map_err(|source| PipelineError::Publish { manifest: built.manifest_path.clone(), source })?;
        let path = crate::publish::record::record_path(&built.manifest_path);
        on_step(Step::Published { record: &record, path: &path });
    }
    Ok(built)
}

/// Boots the image with the firmware EC2 would give it and waits for the login prompt.
fn boot(built: &BuildOutput, progress: &dyn Progress) -> Result<BootReport, PipelineError> {
    let arch = built.manifest.arch;
    let opts = BootOptions {
        arch,
        firmware: if built.manifest.boot == BootMode::Bios { Firmware::Bios } else { Firmware::Uefi },
        timeout: request::launch_timeout(arch),
        expect: crate::boot::LOGIN_PROMPT.into(),
        memory_mib: request::DEFAULT_MEMORY_MIB,
        echo: false,
        trust: request::trust(Some(&built.manifest)),
    };
    crate::boot::boot_with_progress(&built.image_path, &opts, progress)
        .map_err(|source| PipelineError::Boot { image: built.image_path.clone(), source })
}

/// Tests the image and records the verdict in its manifest (the copy in `built` too).
fn test(
    built: &mut BuildOutput,
    req: &TestRequest,
    progress: &dyn Progress,
    on_step: &mut impl FnMut(Step<'_>),
) -> Result<TestOutcome, PipelineError> {
    let target = TestTarget {
        image: built.image_path.clone(),
        manifest: Some((built.manifest_path.clone(), built.manifest.clone())),
    };
    let opts = request::options(&target, req)?;
    on_step(Step::Testing { image: &target.image, options: &opts });
    let outcome = request::run(&target, &opts, req.keep_logs, progress)?;
    request::record_result(&built.manifest_path, &mut built.manifest, &outcome)?;
    on_step(Step::Tested(&outcome));
    Ok(outcome)
}
