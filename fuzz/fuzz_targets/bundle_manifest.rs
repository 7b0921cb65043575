//! Fuzzes the instance-store bundle manifest reader `kiln unbundle` starts with: any text must
//! give a manifest or a typed error naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kiln_formats::bundle::BundleManifest::parse(std::path::Path::new("fuzz.manifest.xml"), text);
    }
});
