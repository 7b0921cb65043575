//! dpkg's database in a staged tree: the installed packages for the manifest and the SBOM.

/// Packages dpkg records as installed in a staged tree (`/var/lib/dpkg/status`), sorted.
pub fn installed_packages(tree: &crate::formats::tree::Tree) -> Vec<crate::manifest::Package> {
    match tree.file_bytes(b"/var/lib/dpkg/status") {
        Ok(Some(buf)) => parse_dpkg_status(&String::from_utf8_lossy(&buf)),
        _ => Vec::new(),
    }
}

pub fn parse_dpkg_status(text: &str) -> Vec<crate::manifest::Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let (mut name, mut version, mut arch, mut installed) = (None, None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Architecture: ") {
                arch = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), Some(a), true) = (name, version, arch, installed) {
            out.push(crate::manifest::Package { name: n.into(), version: v.into(), arch: a.into(), origin: None });
        }
    }
    out.sort();
    out
}

/// Every installed package with its source package and the licenses its copyright file
/// names, for the SBOM; in the manifest's order.
pub fn sbom_packages(tree: &crate::formats::tree::Tree) -> Vec<crate::formats::spdx::SbomPackage> {
    let status = match tree.file_bytes(b"/var/lib/dpkg/status") {
        Ok(Some(buf)) => String::from_utf8_lossy(&buf).into_owned(),
        _ => return Vec::new(),
    };
    let mut sources = std::collections::BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |k: &str| para.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        if let Some(name) = field("Package: ") {
            // `Source: name (version)` when the binary's version differs from its source's.
            let source = field("Source: ").and_then(|s| s.split_whitespace().next()).unwrap_or(name);
            sources.insert(name.to_string(), source.to_string());
        }
    }
    parse_dpkg_status(&status)
        .into_iter()
        .map(|p| {
            let copyright = format!("/usr/share/doc/{}/copyright", p.name);
            let licenses = match tree.file_bytes(copyright.as_bytes()) {
                Ok(Some(b)) => crate::formats::spdx::debian_copyright_licenses(&String::from_utf8_lossy(&b)),
                _ => Vec::new(),
            };
            crate::formats::spdx::SbomPackage {
                source: sources.get(&p.name).cloned().unwrap_or_else(|| p.name.clone()),
                name: p.name,
                version: p.version,
                arch: p.arch,
                licenses,
                origin: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_keeps_only_installed() {
        let s = "Package: a\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n\nPackage: b\nStatus: deinstall ok config-files\nVersion: 2\nArchitecture: all\n";
        let p = parse_dpkg_status(s);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].name.as_str(), p[0].version.as_str()), ("a", "1.0"));
    }
}
