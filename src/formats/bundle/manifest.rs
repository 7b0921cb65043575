//! `NAME.manifest.xml`, version 2007-10-10: written as one line exactly as the AMI tools' REXML
//! serializer does (`<?xml version='1.0'?>`, single-quoted attributes, no whitespace), and read
//! back keeping the exact bytes of the two signed elements.

use std::path::Path;

use super::{BundleError, Result};

pub const MANIFEST_VERSION: &str = "2007-10-10";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartEntry {
    pub filename: String,
    pub sha1: String,
}

/// Everything a manifest states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleManifest {
    pub bundler_name: String,
    pub bundler_version: String,
    pub bundler_release: String,
    pub arch: String,
    /// (virtual, device) pairs, e.g. (`ami`, `sda1`), (`root`, `/dev/sda1`).
    pub mappings: Vec<(String, String)>,
    pub name: String,
    pub user: String,
    pub tar_sha1: String,
    pub size: u64,
    pub bundled_size: u64,
    pub ec2_encrypted_key: String,
    pub user_encrypted_key: String,
    pub ec2_encrypted_iv: String,
    pub user_encrypted_iv: String,
    pub parts: Vec<PartEntry>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl BundleManifest {
    /// The bytes the signature covers: the machine_configuration element immediately followed
    /// by the image element, exactly as they appear in the file.
    pub fn signed_text(&self) -> String {
        let mut s = String::new();
        s.push_str("<machine_configuration>");
        s.push_str(&format!("<architecture>{}</architecture>", esc(&self.arch)));
        if !self.mappings.is_empty() {
            s.push_str("<block_device_mapping>");
            for (v, d) in &self.mappings {
                s.push_str(&format!("<mapping><virtual>{}</virtual><device>{}</device></mapping>", esc(v), esc(d)));
            }
            s.push_str("</block_device_mapping>");
        }
        s.push_str("</machine_configuration><image>");
        s.push_str(&format!("<name>{}</name>", esc(&self.name)));
        s.push_str(&format!("<user>{}</user><type>machine</type>", esc(&self.user)));
        s.push_str(&format!("<digest algorithm='SHA1'>{}</digest>", self.tar_sha1));
        s.push_str(&format!("<size>{}</size><bundled_size>{}</bundled_size>", self.size, self.bundled_size));
        s.push_str(&format!(
            "<ec2_encrypted_key algorithm='AES-128-CBC'>{}</ec2_encrypted_key>",
            self.ec2_encrypted_key
        ));
        s.push_str(&format!(
            "<user_encrypted_key algorithm='AES-128-CBC'>{}</user_encrypted_key>",
            self.user_encrypted_key
        ));
        s.push_str(&format!("<ec2_encrypted_iv>{}</ec2_encrypted_iv>", self.ec2_encrypted_iv));
        s.push_str(&format!("<user_encrypted_iv>{}</user_encrypted_iv>", self.user_encrypted_iv));
        s.push_str(&format!("<parts count='{}'>", self.parts.len()));
        for (i, p) in self.parts.iter().enumerate() {
            s.push_str(&format!(
                "<part index='{i}'><filename>{}</filename><digest algorithm='SHA1'>{}</digest></part>",
                esc(&p.filename),
                p.sha1
            ));
        }
        s.push_str("</parts></image>");
        s
    }

    /// The whole file, given the hex signature over [`signed_text`](Self::signed_text).
    pub fn to_xml(&self, signature_hex: &str) -> String {
        format!(
            "<?xml version='1.0'?><manifest><version>{MANIFEST_VERSION}</version><bundler><name>{}</name><version>{}</version><release>{}</release></bundler>{}<signature>{signature_hex}</signature></manifest>",
            esc(&self.bundler_name),
            esc(&self.bundler_version),
            esc(&self.bundler_release),
            self.signed_text()
        )
    }

    /// Parses a manifest; returns it, the exact signed bytes as they are in the file, and the
    /// signature hex.
    pub fn parse(path: &Path, text: &str) -> Result<(BundleManifest, String, String)> {
        Self::parse_text(text).map_err(|message| BundleError::Manifest { path: path.into(), message })
    }

    fn parse_text(text: &str) -> std::result::Result<(BundleManifest, String, String), String> {
        let doc = roxmltree::Document::parse(text).map_err(|e| format!("not XML: {e}"))?;
        let root = doc.root_element();
        if root.tag_name().name() != "manifest" {
            return Err(format!("root element is <{}>, not <manifest>", root.tag_name().name()));
        }
        fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
            n.children().find(|c| c.has_tag_name(name))
        }
        fn need<'a, 'i>(
            n: roxmltree::Node<'a, 'i>,
            name: &str,
        ) -> std::result::Result<roxmltree::Node<'a, 'i>, String> {
            child(n, name).ok_or_else(|| format!("<{}> has no <{name}>", n.tag_name().name()))
        }
        fn text_of(n: roxmltree::Node<'_, '_>, name: &str) -> std::result::Result<String, String> {
            Ok(need(n, name)?.text().unwrap_or("").trim().to_string())
        }
        let version = text_of(root, "version")?;
        if version != MANIFEST_VERSION {
            return Err(format!("manifest version {version:?}; kiln reads {MANIFEST_VERSION}"));
        }
        let bundler = need(root, "bundler")?;
        let mc = need(root, "machine_configuration")?;
        let image = need(root, "image")?;
        let mut mappings = Vec::new();
        if let Some(bdm) = child(mc, "block_device_mapping") {
            for m in bdm.children().filter(|c| c.has_tag_name("mapping")) {
                mappings.push((text_of(m, "virtual")?, text_of(m, "device")?));
            }
        }
        let parts_el = need(image, "parts")?;
        let mut parts = Vec::new();
        for (i, p) in parts_el.children().filter(|c| c.has_tag_name("part")).enumerate() {
            let idx: usize =
                p.attribute("index").and_then(|v| v.parse().ok()).ok_or_else(|| "part without index".to_string())?;
            if idx != i {
                return Err(format!("part {i} has index {idx}; parts must be listed in order"));
            }
            parts.push(PartEntry { filename: text_of(p, "filename")?, sha1: text_of(p, "digest")?.to_lowercase() });
        }
        let count: usize = parts_el.attribute("count").and_then(|v| v.parse().ok()).unwrap_or(parts.len());
        if count != parts.len() {
            return Err(format!("parts count='{count}' but {} parts are listed", parts.len()));
        }
        let num = |name: &str| -> std::result::Result<u64, String> {
            let t = text_of(image, name)?;
            t.parse().map_err(|_| format!("<{name}> {t:?} is not a number"))
        };
        let m = BundleManifest {
            bundler_name: text_of(bundler, "name")?,
            bundler_version: text_of(bundler, "version")?,
            bundler_release: child(bundler, "release").and_then(|n| n.text()).unwrap_or("").to_string(),
            arch: text_of(mc, "architecture")?,
            mappings,
            name: text_of(image, "name")?,
            user: text_of(image, "user")?,
            tar_sha1: text_of(image, "digest")?.to_lowercase(),
            size: num("size")?,
            bundled_size: num("bundled_size")?,
            ec2_encrypted_key: text_of(image, "ec2_encrypted_key")?,
            user_encrypted_key: text_of(image, "user_encrypted_key")?,
            ec2_encrypted_iv: text_of(image, "ec2_encrypted_iv")?,
            user_encrypted_iv: text_of(image, "user_encrypted_iv")?,
            parts,
        };
        let signed = format!("{}{}", &text[mc.range()], &text[image.range()]);
        let sig = text_of(root, "signature")?;
        Ok((m, signed, sig))
    }
}
