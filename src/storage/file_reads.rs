//! Reading local files from async code without a thread hop per chunk.
//! Bytes already in the page cache (nearly always: a blob written moments
//! ago, or a layer pulled often) are copied right here, which costs less
//! than waking a blocking thread; only a read that would wait for the disk
//! goes to the blocking pool.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

/// Bytes read (and handed to the connection) at a time: large enough to
/// keep syscalls cheap, small enough that a stalled client holds little.
pub const CHUNK: usize = 256 * 1024;

/// Up to `len` bytes at `pos`; fewer only where the file ends or the page
/// cache holds fewer. An error if the file ends before `pos`.
pub async fn read_chunk(file: &Arc<std::fs::File>, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    let n = match read_into(file, &mut buf, len, pos, Some(libc::RWF_NOWAIT)) {
        Ok(n) => n,
        // Not in the page cache; or a filesystem, kernel or sandbox that
        // cannot tell (the plain read then says what is really wrong).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            let file = Arc::clone(file);
            let (read, n) = tokio::task::spawn_blocking(move || {
                let n = read_into(&file, &mut buf, len, pos, None)?;
                Ok::<_, io::Error>((buf, n))
            })
            .await
            .map_err(io::Error::other)??;
            buf = read;
            n
        }
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shorter than expected",
        ));
    }
    Ok(buf.freeze())
}

/// One read of at most `len` bytes at `pos` into `buf`'s spare capacity,
/// which the kernel fills without it being zeroed first (a memset of
/// every chunk otherwise); `buf` (empty before) then holds the bytes
/// read. `preadv2` with `flags` (`RWF_NOWAIT`), or a plain `pread`
/// without, which every kernel and sandbox has.
fn read_into(
    file: &std::fs::File,
    buf: &mut BytesMut,
    len: usize,
    pos: u64,
    flags: Option<i32>,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.clear();
    buf.reserve(len);
    let into = buf.spare_capacity_mut().as_mut_ptr().cast();
    let offset = libc::off_t::try_from(pos).map_err(io::Error::other)?;
    // SAFETY: `into` is `len` bytes of `buf`'s spare capacity (reserved
    // above), writable while `buf` is borrowed here; the kernel writes at
    // most that many.
    let n = unsafe {
        match flags {
            Some(flags) => {
                let iov = libc::iovec {
                    iov_base: into,
                    iov_len: len,
                };
                libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags)
            }
            None => libc::pread(file.as_raw_fd(), into, len, offset),
        }
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialized the first `n` bytes of the spare
    // capacity.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// Bytes `start..end` of a file, [`CHUNK`] at a time.
pub fn stream(
    file: std::fs::File,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = Arc::new(file);
    futures_util::stream::try_unfold(start, move |pos| {
        let file = Arc::clone(&file);
        async move {
            if pos >= end {
                return Ok(None);
            }
            let len = (end - pos).min(CHUNK as u64) as usize;
            let chunk = read_chunk(&file, pos, len).await?;
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, next)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn temp_file(contents: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("kura-file-reads-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[tokio::test]
    async fn streams_the_requested_range_in_chunks() {
        let contents: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| i as u8).collect();
        let chunks: Vec<Bytes> = stream(temp_file(&contents), 5, contents.len() as u64 - 3)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), contents[5..contents.len() - 3]);
    }

    #[tokio::test]
    async fn bytes_not_in_the_page_cache_are_read_on_the_blocking_pool() {
        use rustix::fs::{Advice, fadvise};
        let contents: Vec<u8> = (0..CHUNK + 7).map(|i| (i % 251) as u8).collect();
        let file = temp_file(&contents);
        file.sync_all().unwrap();
        // Clean pages can be dropped; RWF_NOWAIT then finds nothing cached.
        fadvise(&file, 0, None, Advice::DontNeed).unwrap();
        let chunks: Vec<Bytes> = stream(file, 0, contents.len() as u64)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(chunks.concat(), contents);
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_is_an_error() {
        let file = temp_file(b"short");
        let err = stream(file, 0, 100).try_collect::<Vec<_>>().await;
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
