//! What an image is to be and what it became: a [`recipe`] is TOML text turned into validated
//! types, a [`manifest`] describes a built image for the steps after the build, and
//! [`platform`] and [`ec2`] hold the rules both are judged by. Nothing here reaches AWS, a
//! terminal or the command line; [`outputs`] names the files that go with an image. `kiln`
//! re-exports these modules under the same names.

pub mod ec2;
pub mod manifest;
pub mod outputs;
pub mod platform;
pub mod recipe;

pub use kiln_formats as formats;
