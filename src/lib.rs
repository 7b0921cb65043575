//! kiln: bakes golden machine images without a build instance.
//!
//! The library holds everything but the command line: on-disk formats under [`formats`]
//! (plain libraries that know nothing of recipes, AWS or terminals), and the pipeline stages
//! that use them.

pub mod aws;
pub mod boot;
pub mod build;
pub mod bundle;
pub mod disk;
pub mod formats;
pub mod imds;
pub mod launch;
pub mod manifest;
pub mod message;
pub mod platform;
pub mod progress;
pub mod publish;
pub mod recipe;
pub mod stage;
