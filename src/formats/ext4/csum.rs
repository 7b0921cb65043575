//! ext4's checksums: crc32c in the kernel's raw form (no pre- or post-inversion; the seed is
//! the running value), and the directory-entry and xattr hashes.

/// The kernel's `crc32c(seed, data)`: the standard CRC-32C with the caller's running value,
/// without the final inversion. The crc32c crate inverts on the way in and out, so undo both.
pub fn raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// `s_csum_seed`: crc32c over the file system UUID.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    raw(!0, uuid)
}

/// Per-inode seed: fs seed, then the inode number, then its generation.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    raw(raw(fs_seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

/// `e_hash` of an extended attribute entry whose value is in a block.
pub fn xattr_entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash: u32 = 0;
    for &c in name {
        // The kernel walks `char *`, which is signed on x86: sign-extend like it.
        hash = (hash << 5) ^ (hash >> 27) ^ (c as i8 as i32 as u32);
    }
    let mut padded = value.to_vec();
    padded.resize(value.len().div_ceil(4) * 4, 0);
    for w in padded.chunks(4) {
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w.try_into().expect("4 bytes"));
    }
    hash
}

/// `h_hash` of an attribute block from its entries' hashes.
pub fn xattr_block_hash(entry_hashes: &[u32]) -> u32 {
    let mut hash: u32 = 0;
    for &h in entry_hashes {
        if h == 0 {
            return 0;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_crc_matches_the_kernel_convention() {
        // The standard CRC-32C check value of "123456789" is 0xE3069283, i.e. raw(!0, ..) inverted.
        assert_eq!(!raw(!0, b"123456789"), 0xE306_9283);
        // Chaining: raw over a concatenation equals raw over the parts.
        assert_eq!(raw(raw(7, b"abc"), b"def"), raw(7, b"abcdef"));
    }
}
