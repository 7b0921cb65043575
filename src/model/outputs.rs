//! The files that go with an image, named in one place. A build writes `NAME.raw` and the
//! files beside it; `kiln test`, `publish` and `bundle` find and write theirs by the same
//! rule, from whichever of them they are handed. `NAME` is the output name (`NAME-ARCH`).

use std::path::{Path, PathBuf};

/// What kiln writes beside an image, longest first so a name is matched by its whole suffix.
const SUFFIXES: [&str; 11] = [
    ".publish-state.json",
    ".intoto.jsonl",
    ".manifest.json",
    ".publish.json",
    ".bundle.json",
    ".raw.sha256",
    ".spdx.json",
    ".test.json",
    ".keys",
    ".raw",
    ".test",
];

/// An image's files in one directory, by the image's output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    dir: PathBuf,
    name: String,
}

impl Outputs {
    /// The files of image `name` (`debian-12-ec2-x86_64`) in `dir`.
    pub fn new(dir: &Path, name: &str) -> Outputs {
        Outputs { dir: dir.to_path_buf(), name: name.to_string() }
    }

    /// The files that go with `path`, any one of them (`out/NAME.raw`, `out/NAME.manifest.json`,
    /// …). A file kiln did not name keeps its whole name as the image's name.
    pub fn of(path: &Path) -> Outputs {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let name = SUFFIXES.iter().find_map(|s| file.strip_suffix(s)).unwrap_or(&file);
        Outputs::new(path.parent().unwrap_or(Path::new("")), name)
    }

    /// Whether `path` is named as an image's build manifest is (`NAME.manifest.json`).
    pub fn is_manifest(path: &Path) -> bool {
        path.file_name().is_some_and(|f| f.to_string_lossy().ends_with(".manifest.json"))
    }

    /// The directory the files lie in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn file(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.name))
    }

    /// The build's provenance: an in-toto Statement in a DSSE envelope, one JSON line.
    pub fn provenance(&self) -> PathBuf {
        self.file(".intoto.jsonl")
    }

    /// The Secure Boot key hierarchy a build made for the image (`[secure_boot] generate`):
    /// `NAME.keys/`, with each key's `KEY.key` (mode 0600) and `KEY.crt`.
    pub fn secure_boot_keys(&self) -> PathBuf {
        self.file(".keys")
    }

    /// The sparse raw disk's file name, as the manifest records it (relative to the manifest).
    pub fn image_file_name(&self) -> String {
        format!("{}.raw", self.name)
    }
    /// `NAME.raw`: the sparse raw disk.
    pub fn image(&self) -> PathBuf {
        self.file(".raw")
    }
    /// `NAME.raw.sha256`: checkable with `sha256sum -c`.
    pub fn checksum(&self) -> PathBuf {
        self.file(".raw.sha256")
    }
    /// `NAME.manifest.json`: what the image is (written last by a build).
    pub fn manifest(&self) -> PathBuf {
        self.file(".manifest.json")
    }
    /// `NAME.spdx.json`: the SBOM.
    pub fn sbom(&self) -> PathBuf {
        self.file(".spdx.json")
    }
    /// `NAME.test.json`: `kiln test`'s report.
    pub fn test_report(&self) -> PathBuf {
        self.file(".test.json")
    }
    /// `NAME.test/`: the logs `kiln test` keeps when a check fails.
    pub fn test_logs(&self) -> PathBuf {
        self.file(".test")
    }
    /// `NAME.publish.json`: the record of the last publish.
    pub fn publish_record(&self) -> PathBuf {
        self.file(".publish.json")
    }
    /// `NAME.publish-state.json`, or `NAME.REGION.publish-state.json` for a region with its own
    /// upload: what an interrupted publish resumes from.
    pub fn publish_state(&self, region: Option<&str>) -> PathBuf {
        match region {
            Some(r) => self.file(&format!(".{r}.publish-state.json")),
            None => self.file(".publish-state.json"),
        }
    }
    /// `NAME.bundle.json`: the record of `kiln bundle`.
    pub fn bundle_record(&self) -> PathBuf {
        self.file(".bundle.json")
    }
    /// The files a build writes, each replaced whole: what a killed build may have left a
    /// temporary of.
    pub fn build_files(&self) -> [PathBuf; 5] {
        [self.image(), self.checksum(), self.sbom(), self.provenance(), self.manifest()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_leads_back_to_the_same_outputs() {
        let o = Outputs::new(Path::new("out"), "debian-12-ec2-x86_64");
        let all = [
            o.image(),
            o.checksum(),
            o.manifest(),
            o.sbom(),
            o.test_report(),
            o.test_logs(),
            o.publish_record(),
            o.publish_state(None),
            o.bundle_record(),
        ];
        for p in &all {
            assert_eq!(Outputs::of(p), o, "{}", p.display());
        }
        assert_eq!(o.manifest(), Path::new("out/debian-12-ec2-x86_64.manifest.json"));
        assert_eq!(
            o.publish_state(Some("eu-west-1")),
            Path::new("out/debian-12-ec2-x86_64.eu-west-1.publish-state.json")
        );
        assert_eq!(o.image_file_name(), "debian-12-ec2-x86_64.raw");
        assert!(Outputs::is_manifest(&o.manifest()) && !Outputs::is_manifest(&o.image()));
        // A bare name stays bare; an unknown suffix stays part of the name.
        assert_eq!(Outputs::of(Path::new("x.raw")).manifest(), Path::new("x.manifest.json"));
        assert_eq!(Outputs::of(Path::new("d/disk.img")).manifest(), Path::new("d/disk.img.manifest.json"));
    }
}
