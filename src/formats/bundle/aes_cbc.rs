//! AES-128-CBC with PKCS#7 padding as a stream, byte-compatible with
//! `openssl enc -aes-128-cbc -K KEY -iv IV` (no salt header). The `cbc` crate does the
//! chaining; this module only keeps the streaming state (the carried partial block on the way
//! in, the held-back final block on the way out) that its one-shot padding helpers lack.

use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use aes::{Aes128, Block};

const BLOCK: usize = 16;

pub struct Encryptor {
    mode: cbc::Encryptor<Aes128>,
    carry: Vec<u8>,
}

impl Encryptor {
    pub fn new(key: &[u8; 16], iv: &[u8; 16]) -> Encryptor {
        Encryptor { mode: cbc::Encryptor::new(&(*key).into(), &(*iv).into()), carry: Vec::with_capacity(BLOCK) }
    }

    /// Encrypts as many whole blocks as `data` (plus the carried remainder) holds, appending
    /// the ciphertext to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        if !self.carry.is_empty() {
            let take = (BLOCK - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < BLOCK {
                return;
            }
            out.extend_from_slice(&self.carry);
            self.carry.clear();
        }
        let whole = data.len() / BLOCK * BLOCK;
        out.extend_from_slice(&data[..whole]);
        self.carry.extend_from_slice(&data[whole..]);
        let (blocks, rest) = Block::slice_as_chunks_mut(&mut out[start..]);
        debug_assert!(rest.is_empty());
        self.mode.encrypt_blocks(blocks);
    }

    /// PKCS#7: always pad, 1 to 16 bytes each holding the pad length.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        let pad = BLOCK - self.carry.len();
        let mut last = Block::from([pad as u8; BLOCK]);
        last[..self.carry.len()].copy_from_slice(&self.carry);
        self.mode.encrypt_block(&mut last);
        out.extend_from_slice(&last);
    }
}

/// Reads ciphertext from `inner` and yields plaintext with the PKCS#7 padding removed.
pub struct DecryptReader<R> {
    inner: R,
    mode: cbc::Decryptor<Aes128>,
    /// Ciphertext not yet decrypted (less than a block, or the held-back final block).
    pending: Vec<u8>,
    /// Decrypted plaintext not yet returned.
    ready: Vec<u8>,
    ready_at: usize,
    eof: bool,
}

impl<R: std::io::Read> DecryptReader<R> {
    pub fn new(inner: R, key: &[u8; 16], iv: &[u8; 16]) -> Self {
        DecryptReader {
            inner,
            mode: cbc::Decryptor::new(&(*key).into(), &(*iv).into()),
            pending: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            eof: false,
        }
    }

    fn refill(&mut self) -> std::io::Result<()> {
        self.ready.clear();
        self.ready_at = 0;
        let mut buf = vec![0u8; 1 << 20];
        while self.ready.is_empty() && !self.eof {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                self.eof = true;
                if self.pending.len() != BLOCK {
                    return Err(std::io::Error::other(format!(
                        "ciphertext length is not a multiple of 16 bytes ({} bytes left over)",
                        self.pending.len() % BLOCK
                    )));
                }
                let mut last = Block::try_from(&self.pending[..]).expect("one block");
                self.mode.decrypt_block(&mut last);
                let pad = last[BLOCK - 1] as usize;
                if pad == 0 || pad > BLOCK || last[BLOCK - pad..].iter().any(|&b| b as usize != pad) {
                    return Err(std::io::Error::other("bad PKCS#7 padding (wrong key or IV, or damaged data)"));
                }
                self.ready.extend_from_slice(&last[..BLOCK - pad]);
                self.pending.clear();
                break;
            }
            self.pending.extend_from_slice(&buf[..n]);
            // Hold back the last whole block: it carries the padding, known only at EOF.
            let avail = self.pending.len();
            let whole = if avail % BLOCK == 0 { avail.saturating_sub(BLOCK) } else { avail / BLOCK * BLOCK };
            self.ready.extend(self.pending.drain(..whole));
            let (blocks, _) = Block::slice_as_chunks_mut(&mut self.ready[..]);
            self.mode.decrypt_blocks(blocks);
        }
        Ok(())
    }
}

impl<R: std::io::Read> std::io::Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ready_at == self.ready.len() {
            if self.eof {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = (self.ready.len() - self.ready_at).min(buf.len());
        buf[..n].copy_from_slice(&self.ready[self.ready_at..self.ready_at + n]);
        self.ready_at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn round_trip_every_length_mod_16() {
        let key = [7u8; 16];
        let iv = [9u8; 16];
        for len in 0..40usize {
            let plain: Vec<u8> = (0..len as u8).collect();
            let mut e = Encryptor::new(&key, &iv);
            let mut out = Vec::new();
            for piece in plain.chunks(5) {
                e.update(piece, &mut out);
            }
            e.finish(&mut out);
            assert_eq!(out.len(), (len / 16 + 1) * 16);
            let mut back = Vec::new();
            DecryptReader::new(&out[..], &key, &iv).read_to_end(&mut back).unwrap();
            assert_eq!(back, plain);
        }
    }
}
