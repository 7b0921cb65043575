//! kiln: bakes golden machine images without a build instance.
//!
//! The library holds everything but the command line: the pipeline stages, the on-disk formats
//! they use, re-exported as [`formats`] from the `kiln-formats` crate (`src/formats`), which
//! knows nothing of recipes, AWS or terminals, and the recipe and manifest model
//! ([`recipe`], [`manifest`], [`platform`], [`ec2`]) from the `kiln-model` crate (`src/model`),
//! which knows nothing of AWS calls or terminals.

pub mod aws;
pub mod boot;
pub mod build;
pub mod bundle;
pub mod diff;
pub mod digest_cache;
pub mod dirs;
pub mod disk;
pub use kiln_formats as formats;
pub use kiln_model::ec2;
pub mod host;
pub mod imds;
pub mod interrupt;
pub mod launch;
pub use kiln_model::manifest;
pub mod message;
pub mod pipeline;
pub mod plan;
pub use kiln_formats::progress;
pub use kiln_model::outputs;
pub use kiln_model::platform;
pub mod provenance;
pub mod publish;
pub mod pull;
pub mod remote;
pub use kiln_model::recipe;
pub mod secure_boot;
pub mod share;
pub mod stage;
