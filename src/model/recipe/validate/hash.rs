//! The recipe hash: every byte that decides the image, with source files by their digest.

use sha2::{Digest, Sha256};

use super::*;
use crate::recipe::raw::RawBase;
use crate::recipe::service::{Service, StepAction};
use crate::recipe::KeySource;

/// The recipe hash, over, in this order:
/// 1. `kiln-recipe-v2\0`;
/// 2. each recipe file, base-most first: `recipe\0`, its length (u64 LE), its bytes;
/// 3. each `[[files]]` source, in `files` order: `source\0`, the image path, `\0`, the file's
///    length (u64 LE) and SHA-256;
/// 4. a tarball base: `tarball\0`, its length (u64 LE) and SHA-256;
/// 5. the service layer's files, each only when the recipe has it: every repository key
///    (`key\0`, the repository's name, `\0`), every local package (`local\0`) and every step
///    script (`script\0`), in recipe order, each by length (u64 LE) and SHA-256;
/// 6. with `[secure_boot]`: `secure_boot\0`, then every certificate the recipe names (PK, KEK,
///    db, in recipe order) and dbx by length (u64 LE) and the SHA-256 of its DER or bytes.
///    The private key is not hashed (its certificate in db stands for it), nor are generated
///    keys (the manifest records them).
///
/// Lengths frame every part, so no two different inputs hash the same bytes. Files enter by
/// their own digest so an unchanged one need not be read again ([`FileDigests`]).
pub(super) fn recipe_hash(
    v: &mut V,
    digests: &dyn FileDigests,
    raw: &RawRecipe,
    files: &[FileEntry],
    base: &Base,
    service: &Service,
    secure_boot: Option<&crate::recipe::SecureBoot>,
) -> String {
    let raw_files = &raw.files;
    let raw_base: Option<&Loc<RawBase>> = raw.image.as_ref().and_then(|i| i.value.base.as_ref());
    let mut h = Sha256::new();
    h.update(b"kiln-recipe-v2\0");
    for f in v.src.files.iter().rev() {
        h.update(b"recipe\0");
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    // Entries that failed validation were dropped, so match sources to their raw entry by
    // position among the raw entries with a source.
    let source_spans: Vec<&Loc<String>> = raw_files.iter().flatten().filter_map(|f| f.value.source.as_ref()).collect();
    let mut n = 0;
    for f in files {
        if let FileKind::File { content: FileContent::Source(p) } = &f.kind {
            let at = source_spans.get(n).copied();
            n += 1;
            h.update(b"source\0");
            h.update(f.path.as_bytes());
            h.update([0]);
            hash_file(v, digests, &mut h, p, at, "files.source");
        }
    }
    if let Base::Tarball(p) = base {
        h.update(b"tarball\0");
        let at = raw_base.and_then(|b| b.value.tarball.as_ref());
        hash_file(v, digests, &mut h, p, at, "image.base.tarball");
    }
    // Validation kept only valid entries, in recipe order; these files were all read once
    // already, so a failure here is a file that changed under kiln.
    for r in &service.repositories {
        h.update(b"key\0");
        h.update(r.name.as_bytes());
        h.update([0]);
        hash_file(v, digests, &mut h, &r.key, None, "repositories.key");
    }
    for l in &service.local {
        h.update(b"local\0");
        hash_file(v, digests, &mut h, &l.path, None, "packages.local");
    }
    for s in &service.steps {
        if let StepAction::Script(p) = &s.action {
            h.update(b"script\0");
            hash_file(v, digests, &mut h, p, None, "steps.script");
        }
    }
    if let Some(sb) = secure_boot {
        h.update(b"secure_boot\0");
        let certs: Vec<&Vec<u8>> = match &sb.keys {
            KeySource::Files { pk, kek, db, .. } => std::iter::once(pk).chain(kek).chain(db).collect(),
            // The generated keys are made by the build; the recipe brings only these.
            KeySource::Generate { db } => db.iter().collect(),
        };
        for part in certs.into_iter().chain(sb.dbx.as_ref()) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(Sha256::digest(part));
        }
    }
    hex::encode(h.finalize())
}

pub(super) fn hash_file(
    v: &mut V,
    digests: &dyn FileDigests,
    h: &mut Sha256,
    path: &Path,
    at: Option<&Loc<String>>,
    key: &str,
) {
    match digests.digest(path) {
        Ok(d) => {
            h.update(d.len.to_le_bytes());
            h.update(d.sha256);
        }
        Err(e) => {
            let span = at.map(|a| a.span).unwrap_or(Span { file: 0, start: 0, end: 0 });
            v.err(span, key, format!("cannot read {}: {e}", path.display()), None);
        }
    }
}
