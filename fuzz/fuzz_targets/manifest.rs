//! Fuzzes the build manifest loader (`kiln publish`, `kiln bundle`, `kiln test` take a manifest
//! that may have been edited or made by another tool): any bytes must give a manifest whose AMI
//! settings pass EC2's rules, or a typed error; never a panic on out-of-range sizes, IOPS or
//! block lists.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("manifest", data);
    match kiln_model::manifest::Manifest::load(&path) {
        Ok(m) => {
            let _ = m.image_path(&path);
            let _ = m.to_json();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
