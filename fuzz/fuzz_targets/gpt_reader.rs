//! Fuzzes the GPT reading `kiln inspect` and `kiln test` do on an image they are handed: any
//! bytes must give the partition types or None, never a panic (LBA ranges past the end,
//! entry counts and sizes out of range).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("gpt", data);
    let _ = kiln_formats::gpt::partition_types(&path);
});
