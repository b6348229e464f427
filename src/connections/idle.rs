//! Idle connections: a client connection that moves no byte in either
//! direction for `http.timeouts.idle`, while Kura is not itself the party
//! awaited, is closed.
//!
//! "Kura is awaited" means a request's handler is still running or its
//! response body is waiting for its source (a cold blob waits up to the
//! upstream's `responsetimeout`, then up to its `idletimeout` between
//! chunks); those waits are bounded upstream, and cutting the client for
//! them would fail pulls Kura is about to serve. Everything else is the
//! client's turn: sending a request, reading a response (a slow reader
//! keeps its connection as long as it takes bytes off the wire), or
//! nothing at all.
//!
//! A read-side timeout alone would not do: hyper keeps polling the read
//! side while it writes a body, so it would cut long downloads. Hence a
//! stream wrapper ([`Watched`]) that sees both directions, and a service
//! wrapper ([`Tracked`]) that tells it when Kura is busy.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Response;
use futures_util::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// What one connection's requests are doing; shared by its stream and its
/// service.
#[derive(Default)]
pub struct Activity {
    /// Requests whose handler runs or whose body waits for its source.
    kura_busy: AtomicUsize,
    /// The connection's task, woken when Kura stops being busy so that its
    /// idle clock starts even if the socket stays quiet.
    connection: AtomicWaker,
}

impl Activity {
    fn kura_busy(&self) -> bool {
        self.kura_busy.load(Ordering::Acquire) > 0
    }
}

/// One request's share of [`Activity::kura_busy`], given back on drop.
struct Busy {
    activity: Arc<Activity>,
    held: bool,
}

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.kura_busy.fetch_add(1, Ordering::AcqRel);
        Self {
            activity,
            held: true,
        }
    }

    fn set(&mut self, busy: bool) {
        if busy == self.held {
            return;
        }
        self.held = busy;
        if busy {
            self.activity.kura_busy.fetch_add(1, Ordering::AcqRel);
        } else if self.activity.kura_busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.connection.wake();
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The connection's service: marks Kura busy from the request until its
/// response body is waiting on the client (or gone).
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S, R, B> Service<R> for Tracked<S>
where
    S: Service<R, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let busy = Busy::new(self.activity.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody { body, busy }))
        })
    }
}

/// A response body that reports whether it is waiting for its source
/// (Kura busy) or for hyper to ask for more (the client's turn).
pub struct TrackedBody<B> {
    body: B,
    busy: Busy,
}

impl<B: HttpBody + Unpin> HttpBody for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.busy.set(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether the idle clock runs.
#[derive(Clone, Copy)]
enum Stall {
    /// Bytes move, or Kura is busy.
    No,
    /// The client is awaited and nothing moves; `unsent` is what the
    /// kernel's send queue held, unacknowledged, when that began.
    Since { unsent: Option<usize> },
}

/// A client's TCP stream with its connection slot and idle clock. The slot
/// returns when the connection ends, however it ends.
pub struct Watched {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    activity: Arc<Activity>,
    idle: Duration,
    clock: Pin<Box<Sleep>>,
    stalled: Stall,
    /// The last write found the send buffer full: the client is not reading.
    write_blocked: bool,
}

impl Watched {
    pub fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        activity: Arc<Activity>,
        idle: Duration,
    ) -> Self {
        Self {
            stream,
            _slot: slot,
            activity,
            idle,
            clock: Box::pin(tokio::time::sleep(idle)),
            stalled: Stall::No,
            write_blocked: false,
        }
    }

    /// Called whenever the socket has nothing to give or take: pending, or
    /// an error once the client has let nothing move for `idle`.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.activity.connection.register(cx.waker());
        if self.activity.kura_busy() && !self.write_blocked {
            self.stalled = Stall::No;
            return Poll::Pending;
        }
        loop {
            let unsent_then = match self.stalled {
                Stall::Since { unsent } => unsent,
                Stall::No => {
                    let unsent = unsent_bytes(&self.stream);
                    self.stalled = Stall::Since { unsent };
                    self.clock.as_mut().reset(Instant::now() + self.idle);
                    unsent
                }
            };
            if self.clock.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A slow reader drains the kernel's send buffer long before
            // there is room for the next write: that is movement too.
            match (unsent_then, unsent_bytes(&self.stream)) {
                (Some(then), Some(now)) if now < then => self.stalled = Stall::No,
                _ => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client connection idle for http.timeouts.idle",
                    ));
                }
            }
        }
    }

    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Pending => {
                self.write_blocked = true;
                self.poll_idle(cx).map(Err)
            }
            Poll::Ready(Ok(n)) if n > 0 => {
                self.write_blocked = false;
                self.stalled = Stall::No;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

/// Bytes queued on the socket that the peer has not acknowledged yet.
#[cfg(target_os = "linux")]
fn unsent_bytes(stream: &TcpStream) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int; the fd stays
    // open while `stream` is borrowed.
    let rc = unsafe {
        libc::ioctl(
            stream.as_raw_fd(),
            libc::TIOCOUTQ,
            &mut queued as *mut libc::c_int,
        )
    };
    (rc == 0).then_some(queued as usize)
}

#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_stream: &TcpStream) -> Option<usize> {
    None
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.stalled = Stall::No;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
