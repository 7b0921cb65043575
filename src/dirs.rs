//! Where kiln keeps things between runs, by the XDG base directory rules: kiln's own variable
//! first, then the XDG one, then the default under the home directory.

use std::path::{Path, PathBuf};

/// `$OWN`, else `$XDG/kiln`, else `~/HOME_DEFAULT`, else `fallback` (no home at all).
pub fn kiln_dir(own: &str, xdg: &str, home_default: &str, fallback: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(own) {
        return d.into();
    }
    if let Some(d) = std::env::var_os(xdg) {
        return Path::new(&d).join("kiln");
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(home_default),
        None => PathBuf::from(fallback),
    }
}
