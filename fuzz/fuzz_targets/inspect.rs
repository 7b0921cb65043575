//! Fuzzes `kiln inspect` and `kiln inspect --audit` on arbitrary bytes as a disk image: the
//! GPT, each partition's ext4 or FAT summary, and every ext4 tree read back. Any input must give
//! a summary or a typed error, never a panic (LBA ranges past the end or past u64 bytes,
//! partitions ending before they start, seeks outside a partition).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("inspect", data);
    let Ok(disk) = kiln_formats::inspect::read(&path) else { return };
    for p in &disk.partitions {
        if let (Some(kiln_formats::inspect::FileSystem::Ext4(_)), Some(offset)) = (&p.filesystem, p.offset_bytes) {
            if let Ok(tree) = kiln_formats::ext4::read_tree(&path, offset) {
                kiln_fuzz::read_every_file(&tree);
            }
        }
    }
});
