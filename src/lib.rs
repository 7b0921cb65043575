//! kiln: bakes golden machine images without a build instance.
//!
//! The library holds everything but the command line: the pipeline stages, and the on-disk
//! formats they use, re-exported as [`formats`] from the `kiln-formats` crate (`src/formats`),
//! which knows nothing of recipes, AWS or terminals.

pub mod aws;
pub mod boot;
pub mod build;
pub mod bundle;
pub mod disk;
pub mod ec2;
pub use kiln_formats as formats;
pub mod imds;
pub mod interrupt;
pub mod launch;
pub mod manifest;
pub mod message;
pub mod platform;
pub use kiln_formats::progress;
pub mod publish;
pub mod recipe;
pub mod stage;
