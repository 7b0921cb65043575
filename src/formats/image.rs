//! The image as one ordered stream of extents, and the sinks that consume it.
//!
//! Every format writer (ext4, FAT, GPT) emits its bytes through [`Sink::write_at`] at strictly
//! ascending, non-overlapping offsets; whatever lies between two writes is zeros and is never
//! passed along. A sink can therefore sparse-write, hash and digest blocks in the same single
//! pass, and a hole costs nothing.

use std::io;

/// Consumer of an ordered extent stream.
pub trait Sink {
    /// `data` belongs at `offset`. Offsets are strictly ascending across calls and never overlap
    /// an earlier write; the range between the end of the previous write and `offset` is zeros.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// The stream is complete and the image is `len` bytes long (trailing zeros included).
    fn finish(&mut self, len: u64) -> io::Result<()> {
        let _ = len;
        Ok(())
    }
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        (**self).finish(len)
    }
}

/// Shifts a stream by `base` bytes: lets a filesystem writer address its own partition from 0.
/// `finish` is not forwarded (the partition's end is not the image's end).
pub struct Window<S> {
    pub base: u64,
    pub inner: S,
}

impl<S: Sink> Sink for Window<S> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(self.base + offset, data)
    }
}

/// Checks the ordering contract and collects the stream in memory; for tests and small images.
#[derive(Debug, Default)]
pub struct VecSink {
    pub bytes: Vec<u8>,
    next: u64,
}

impl Sink for VecSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset < self.next {
            return Err(io::Error::other(format!("write at {offset} goes back before {}", self.next)));
        }
        let end = offset as usize + data.len();
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.bytes[offset as usize..end].copy_from_slice(data);
        self.next = end as u64;
        Ok(())
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        if len < self.next {
            return Err(io::Error::other(format!(
                "image length {len} is shorter than the data written ({})",
                self.next
            )));
        }
        self.bytes.resize(len as usize, 0);
        Ok(())
    }
}
