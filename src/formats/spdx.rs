//! SPDX 2.3 JSON: a software bill of materials for an image — the image itself (by SHA-256)
//! and every package it contains, with the licenses their copyright files declare.
//!
//! Debian's machine-readable copyright files name licenses by Debian short names (`GPL-2+`,
//! `Expat`); the common ones map to SPDX identifiers, any other becomes a `LicenseRef-` that
//! the document declares. A package's declared license is every license its copyright file
//! names, joined with AND (its files are under all of them; a file-level choice, `A or B`, is
//! not resolved for the package).

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbomPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// The source package it was built from.
    pub source: String,
    /// License names as the package's copyright file writes them (`GPL-2+`), in order.
    pub licenses: Vec<String>,
    /// Where it came from when not the distribution's archive, as the build manifest says it:
    /// `repository:NAME` or `local:PATH`.
    pub origin: Option<String>,
}

/// The document's subject.
#[derive(Debug, Clone)]
pub struct SbomImage {
    /// Output name (`debian-12-ec2-x86_64`).
    pub name: String,
    pub sha256: String,
    /// `debian-12`, for package URLs.
    pub distro: String,
    /// Seconds since the epoch: the document's creation time (the image's SOURCE_DATE_EPOCH,
    /// so the same image gives the same document).
    pub created_unix: i64,
    pub tool: String,
}

/// Debian short names with an SPDX identifier of their own.
const DEBIAN_TO_SPDX: [(&str, &str); 30] = [
    ("GPL-1", "GPL-1.0-only"),
    ("GPL-1+", "GPL-1.0-or-later"),
    ("GPL-2", "GPL-2.0-only"),
    ("GPL-2+", "GPL-2.0-or-later"),
    ("GPL-3", "GPL-3.0-only"),
    ("GPL-3+", "GPL-3.0-or-later"),
    ("LGPL-2", "LGPL-2.0-only"),
    ("LGPL-2+", "LGPL-2.0-or-later"),
    ("LGPL-2.1", "LGPL-2.1-only"),
    ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("LGPL-3", "LGPL-3.0-only"),
    ("LGPL-3+", "LGPL-3.0-or-later"),
    ("AGPL-3", "AGPL-3.0-only"),
    ("AGPL-3+", "AGPL-3.0-or-later"),
    ("Expat", "MIT"),
    ("MIT", "MIT"),
    ("BSD-2-clause", "BSD-2-Clause"),
    ("BSD-3-clause", "BSD-3-Clause"),
    ("BSD-4-clause", "BSD-4-Clause"),
    ("ISC", "ISC"),
    ("Apache-2.0", "Apache-2.0"),
    ("Apache-2", "Apache-2.0"),
    ("Zlib", "Zlib"),
    ("zlib", "Zlib"),
    ("CC0-1.0", "CC0-1.0"),
    ("MPL-2.0", "MPL-2.0"),
    ("PSF-2", "PSF-2.0"),
    ("FSFULLR", "FSFULLR"),
    ("FSFAP", "FSFAP"),
    ("X11", "X11"),
];

/// The SPDX identifier for one Debian license name, or a `LicenseRef-` for it.
fn license_id(name: &str) -> (String, bool) {
    if let Some((_, spdx)) = DEBIAN_TO_SPDX.iter().find(|(d, _)| d.eq_ignore_ascii_case(name)) {
        return (spdx.to_string(), false);
    }
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    (format!("LicenseRef-{}", clean.trim_matches('-')), true)
}

/// Splits `A and B or C` into its license names.
fn atoms(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in expr.split([',', '|']) {
        let words: Vec<&str> = part.split_whitespace().collect();
        let mut cur: Vec<&str> = Vec::new();
        for w in words {
            if w.eq_ignore_ascii_case("and") || w.eq_ignore_ascii_case("or") {
                if !cur.is_empty() {
                    out.push(cur.join(" "));
                    cur.clear();
                }
            } else {
                cur.push(w);
            }
        }
        if !cur.is_empty() {
            out.push(cur.join(" "));
        }
    }
    out
}

/// `License:` names in a Debian copyright file (DEP-5), in order, without repeats; empty when
/// the file is not machine-readable.
pub fn debian_copyright_licenses(text: &str) -> Vec<String> {
    if !text.starts_with("Format:") {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("License:") {
            for a in atoms(v.trim()) {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    out
}

fn spdx_id(prefix: &str, parts: &[&str]) -> String {
    let raw = parts.join("-");
    let clean: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    format!("SPDXRef-{prefix}-{clean}")
}

/// The SPDX 2.3 document as JSON text.
pub fn document(image: &SbomImage, packages: &[SbomPackage]) -> String {
    let created = time::OffsetDateTime::from_unix_timestamp(image.created_unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats any time");
    let created = created.replace("+00:00", "Z");
    let mut refs: BTreeMap<String, String> = BTreeMap::new();
    let mut pkgs = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": image.name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "checksums": [{ "algorithm": "SHA256", "checksumValue": image.sha256 }],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "OPERATING-SYSTEM",
    })];
    let mut rels = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    for p in packages {
        let id = spdx_id("Package", &[&p.name, &p.arch]);
        let mut ids: Vec<String> = Vec::new();
        for l in &p.licenses {
            let (lid, is_ref) = license_id(l);
            if is_ref {
                refs.entry(lid.clone()).or_insert_with(|| l.clone());
            }
            if !ids.contains(&lid) {
                ids.push(lid);
            }
        }
        let declared = if ids.is_empty() { "NOASSERTION".to_string() } else { ids.join(" AND ") };
        // The purl's namespace is who publishes the package: Debian, a recipe repository, or
        // nobody but the build host (`local`).
        let (namespace, from) = match p.origin.as_deref().map(|o| o.split_once(':').unwrap_or((o, ""))) {
            Some(("repository", name)) => {
                (name.to_string(), format!("; installed from the recipe repository `{name}`"))
            }
            Some((_, path)) => ("local".to_string(), format!("; installed from the build host's file {path}")),
            None => ("debian".to_string(), String::new()),
        };
        let distro = if p.origin.is_none() { format!("&distro={}", image.distro) } else { String::new() };
        let purl = format!("pkg:deb/{namespace}/{}@{}?arch={}{distro}", p.name, purl_escape(&p.version), p.arch);
        pkgs.push(json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": declared,
            "copyrightText": "NOASSERTION",
            "sourceInfo": format!("built from {} source package {}{from}", if p.origin.is_none() { "Debian" } else { "the" }, p.source),
            "externalRefs": [{ "referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl }],
        }));
        rels.push(
            json!({ "spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS", "relatedSpdxElement": id }),
        );
    }
    let extracted: Vec<Value> = refs
        .iter()
        .map(|(id, name)| {
            json!({
                "licenseId": id,
                "name": name,
                "extractedText": format!("The license Debian's copyright files call `{name}`; its text is in the copyright file of each package that names it (/usr/share/doc/PACKAGE/copyright)."),
            })
        })
        .collect();
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image.name,
        "documentNamespace": format!("https://spdx.org/spdxdocs/kiln-{}-{}", image.name, image.sha256),
        "creationInfo": { "created": created, "creators": [format!("Tool: {}", image.tool)] },
        "packages": pkgs,
        "relationships": rels,
        "hasExtractedLicensingInfos": extracted,
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("SPDX document serializes");
    s.push('\n');
    s
}

/// Package-URL percent-encoding for a version (`1:2.3+dfsg-1` → `1%3A2.3%2Bdfsg-1`).
fn purl_escape(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '~') {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copyright_licenses_are_split_and_mapped() {
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: GPL-3+ and ISC\n\nFiles: a\nLicense: GPL-3 or Apache-2.0\n\nLicense: GPL-3+\n Text\n";
        assert_eq!(debian_copyright_licenses(text), ["GPL-3+", "ISC", "GPL-3", "Apache-2.0"]);
        assert!(debian_copyright_licenses("This is free software.\nLicense: GPL\n").is_empty());
        assert_eq!(license_id("Expat"), ("MIT".to_string(), false));
        assert_eq!(
            license_id("GPL-2 with Linux-syscall-note exception"),
            ("LicenseRef-GPL-2-with-Linux-syscall-note-exception".to_string(), true)
        );
    }

    #[test]
    fn document_is_deterministic_and_declares_its_license_refs() {
        let img = SbomImage {
            name: "x-x86_64".into(),
            sha256: "ab".repeat(32),
            distro: "debian-12".into(),
            created_unix: 1_700_000_000,
            tool: "kiln-0".into(),
        };
        let pkgs = vec![SbomPackage {
            name: "bash".into(),
            version: "5.2.15-2+b2".into(),
            arch: "amd64".into(),
            source: "bash".into(),
            licenses: vec!["GPL-3+".into(), "public-domain".into()],
            origin: None,
        }];
        let a = document(&img, &pkgs);
        assert_eq!(a, document(&img, &pkgs));
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(v["packages"][1]["licenseDeclared"], "GPL-3.0-or-later AND LicenseRef-public-domain");
        assert_eq!(v["hasExtractedLicensingInfos"][0]["licenseId"], "LicenseRef-public-domain");
        assert_eq!(
            v["packages"][1]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64&distro=debian-12"
        );
    }
}
