//! The service layer of a recipe: what a team adds on top of Debian (its own apt repositories,
//! `.deb` files from the build host, users, and build steps). kiln applies it on top of the
//! cached Debian base, so a new build of the team's package does not stage Debian again.

use std::path::PathBuf;

use serde::Serialize;

/// One `[[repositories]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Repository {
    /// `[a-z0-9][a-z0-9._-]*`, unique in the recipe: the image gets
    /// `/etc/apt/sources.list.d/NAME.sources` and `/usr/share/keyrings/NAME.{asc,gpg}`.
    pub name: String,
    /// `http://`, `https://` or `file:` URI, without a trailing `/`.
    pub uri: String,
    /// Suites (`stable`), or one flat-repository path ending in `/` (`./`).
    pub suites: Vec<String>,
    /// Components; empty for a flat repository.
    pub components: Vec<String>,
    /// The OpenPGP public key on the build host (absolute path).
    pub key: PathBuf,
    /// Whether the key file is ASCII-armored (apt names armored keyrings `.asc`, binary `.gpg`).
    pub key_armored: bool,
    /// `recipe.toml:LINE:COLUMN` of the entry.
    pub origin: String,
}

impl Repository {
    /// Where the image keeps the key, named as apt wants for its format.
    pub fn key_path_in_image(&self) -> String {
        format!("/usr/share/keyrings/{}.{}", self.name, if self.key_armored { "asc" } else { "gpg" })
    }

    /// Where the image keeps the repository's apt source.
    pub fn sources_path_in_image(&self) -> String {
        format!("/etc/apt/sources.list.d/{}.sources", self.name)
    }

    /// The deb822 source, with `Signed-By` naming `key_path` (the image's key, or a copy on the
    /// build host while kiln reads the repository).
    pub fn deb822(&self, key_path: &str) -> String {
        let mut s = format!("Types: deb\nURIs: {}\nSuites: {}\n", self.uri, self.suites.join(" "));
        if !self.components.is_empty() {
            s.push_str(&format!("Components: {}\n", self.components.join(" ")));
        }
        s.push_str(&format!("Signed-By: {key_path}\n"));
        s
    }
}

/// One `[packages].local` entry: a `.deb` from the build host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalPackage {
    /// Absolute path on the build host.
    pub path: PathBuf,
    /// The path as the recipe writes it, for messages.
    pub written: String,
    /// `recipe.toml:LINE:COLUMN` of the entry.
    pub origin: String,
}

/// One `[[users]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub name: String,
    /// None: the next free id from 1000 up, as `useradd` allocates it (the same on every build
    /// of the same inputs).
    pub uid: Option<u32>,
    /// Supplementary groups, which must exist in the image.
    pub groups: Vec<String>,
    /// None: useradd's default (`/bin/sh`).
    pub shell: Option<String>,
    /// None: `/home/NAME`.
    pub home: Option<String>,
    /// Lines of `~/.ssh/authorized_keys` (mode 0600, the user's own).
    pub authorized_keys: Vec<String>,
    pub origin: String,
}

impl User {
    pub fn home_dir(&self) -> String {
        self.home.clone().unwrap_or_else(|| format!("/home/{}", self.name))
    }
}

/// What a `[[steps]]` entry runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepAction {
    /// A shell command (`/bin/sh -c`).
    Run(String),
    /// A script on the build host (absolute path), copied in and run; a `#!` line picks its
    /// interpreter, `/bin/sh` otherwise.
    Script(PathBuf),
}

/// One `[[steps]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub action: StepAction,
    pub origin: String,
}

impl Step {
    /// How messages name the step: its command, or its script's file name.
    pub fn describe(&self) -> String {
        match &self.action {
            StepAction::Run(cmd) => {
                let first = cmd.lines().next().unwrap_or_default();
                let short: String = first.chars().take(60).collect();
                let more = short.len() < first.len() || cmd.lines().nth(1).is_some();
                format!("`{short}{}`", if more { "…" } else { "" })
            }
            StepAction::Script(p) => format!("script {}", p.display()),
        }
    }
}

/// The service layer: everything a recipe adds that Debian's own staging does not know.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Service {
    pub repositories: Vec<Repository>,
    pub local: Vec<LocalPackage>,
    pub users: Vec<User>,
    pub steps: Vec<Step>,
}

impl Service {
    /// True when the recipe has nothing for the layer (then no layer is staged at all).
    pub fn is_empty(&self) -> bool {
        self.repositories.is_empty() && self.local.is_empty() && self.users.is_empty() && self.steps.is_empty()
    }
}
