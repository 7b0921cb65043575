//! Parallel gzip that still yields ONE gzip member (like pigz): each chunk is raw-deflated on
//! its own with a sync flush (which ends on a byte boundary with an empty stored block), the
//! pieces are concatenated in order, and an empty final block plus the CRC-32 and length of the
//! whole input close the member. A single member reads everywhere, including decompressors that
//! stop after the first member of a multi-member file.

use flate2::{Compress, Compression, FlushCompress};

/// gzip header: magic 1f 8b, method 8 (deflate), no flags, mtime 0 (so equal input gives equal
/// output), no extra flags, OS 3 (Unix) as gzip writes on Linux.
pub const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

/// A final deflate block with fixed Huffman codes and nothing but end-of-block: the bits
/// BFINAL=1, BTYPE=01, then the 7-bit EOB code 0000000, padded to bytes.
const FINAL_EMPTY_BLOCK: [u8; 2] = [0x03, 0x00];

/// Raw-deflates one chunk, ending with a sync flush so chunks can be concatenated.
pub fn deflate_chunk(input: &[u8], level: u32) -> std::io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    // Incompressible data grows by about 5 bytes per 16 KiB stored block; leave room for that.
    let mut out = Vec::with_capacity(input.len() + input.len() / 1024 + 64);
    loop {
        let consumed = usize::try_from(c.total_in()).expect("chunk fits memory");
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity() / 4 + 64);
        }
        c.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync).map_err(std::io::Error::other)?;
        // The flush is complete once all input is in and the output buffer was not filled.
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

/// The member's closing bytes for an input of `crc`/`len`.
pub fn trailer(crc: u32, len: u64) -> [u8; 10] {
    let mut t = [0u8; 10];
    t[..2].copy_from_slice(&FINAL_EMPTY_BLOCK);
    t[2..6].copy_from_slice(&crc.to_le_bytes());
    // ISIZE is the input length modulo 2^32 (RFC 1952).
    t[6..].copy_from_slice(&(len as u32).to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn chunks_make_one_valid_member() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 / 13) as u8).collect();
        let mut gz = HEADER.to_vec();
        let mut crc = crc32fast::Hasher::new();
        for piece in data.chunks(65_536) {
            crc.update(piece);
            gz.extend(deflate_chunk(piece, 6).unwrap());
        }
        gz.extend(trailer(crc.finalize(), data.len() as u64));
        let mut back = Vec::new();
        // The single-member decoder must see everything.
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
