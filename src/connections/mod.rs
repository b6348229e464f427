//! Client connections: how many may be open at once and how long each may
//! hold Kura's resources without progress (Slowloris and its relatives).
//!
//! - **Limit** (`http.maxconnections`, per listener): a listener accepts a
//!   connection only once it holds a slot, so past the limit connections
//!   wait in the kernel's accept queue rather than being accepted and
//!   closed. The limit is reached by legitimate bursts (a rollout pulling
//!   everywhere at once) as much as by abuse; a queued client is served as
//!   soon as a slot frees, which every stalled connection does within the
//!   timeouts below, whereas a closed one fails its pull, backs off and
//!   retries, adding accept-and-close churn when Kura is busiest. The queue
//!   is the kernel's (bounded by the listen backlog, [`BACKLOG`]), costs
//!   Kura no memory, and past it the kernel drops SYNs, which clients
//!   retransmit. The slot lives in the connection's stream, so it returns
//!   on every path, TLS failures and shutdown included.
//! - **Header timeout** (`http.timeouts.header`): the TLS handshake, the
//!   first request (protocol detection included) and every later HTTP/1.1
//!   request head must each be complete within it. hyper starts that clock
//!   as soon as it is ready for the next request, so it is also HTTP/1.1's
//!   keep-alive limit.
//! - **Idle timeout** (`http.timeouts.idle`): see [`idle`]. It also ends
//!   HTTP/2 connections that stay open with no request.

mod idle;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use axum_server::accept::Accept;
use axum_server::{AddrListener, Address, Server};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ConnectionLimits;
use idle::{Activity, Tracked, Watched};

/// The listen backlog: room for a burst of connections past the limit to
/// queue in the kernel (which caps it at `net.core.somaxconn`). Rust's
/// standard listener asks for only 128.
pub const BACKLOG: u32 = 4096;

/// HTTP/2 streams one connection may have open: what a client pulls in
/// parallel over one connection (containerd: 3 layers by default) with room
/// to spare; each may hold a body chunk, so this bounds a connection's memory.
const HTTP2_MAX_STREAMS: u32 = 16;

/// A listener's connections: the peer address, as axum_server's `Address`.
#[derive(Clone, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl Address for PeerAddr {
    type Stream = Admitted;
    type Listener = LimitedListener;
}

/// A TCP listener that accepts only while it has a free connection slot.
pub struct LimitedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

/// An accepted connection with the slot it occupies.
pub struct Admitted {
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
}

impl AddrListener<Admitted, PeerAddr> for LimitedListener {
    async fn bind_to(_addr: PeerAddr) -> io::Result<Self> {
        Err(io::Error::other(
            "a LimitedListener is made from a bound listener, with its limit",
        ))
    }

    async fn accept_stream(&self) -> io::Result<(Admitted, PeerAddr)> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, peer) = self.listener.accept().await?;
        Ok((Admitted { stream, slot }, PeerAddr(peer)))
    }

    fn get_local_addr(&self) -> io::Result<PeerAddr> {
        self.listener.local_addr().map(PeerAddr)
    }
}

/// Wraps every admitted connection's stream and service so that its idle
/// clock knows when Kura, not the client, is the party awaited.
#[derive(Clone, Copy, Debug)]
pub struct IdleGuard {
    limits: ConnectionLimits,
}

impl<S> Accept<Admitted, S> for IdleGuard {
    type Stream = Watched;
    type Service = Tracked<S>;
    type Future = std::future::Ready<io::Result<(Watched, Tracked<S>)>>;

    fn accept(&self, admitted: Admitted, service: S) -> Self::Future {
        let activity = Arc::new(Activity::default());
        let stream = Watched::new(
            admitted.stream,
            admitted.slot,
            activity.clone(),
            self.limits.idle,
        );
        std::future::ready(Ok((stream, Tracked::new(service, activity))))
    }
}

/// Listens on the first address `addr` resolves to that can be bound, with
/// a [`BACKLOG`]-deep accept queue. Needs a Tokio runtime.
pub fn listen(addr: &str) -> io::Result<TcpListener> {
    let mut last_error = io::Error::new(io::ErrorKind::InvalidInput, "resolves to no address");
    for addr in addr.to_socket_addrs()? {
        match listen_on(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As the standard listener does: a restart may bind while the previous
    // run's connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// An HTTP server on `listener` that holds at most `max` connections, each
/// bounded by `limits`' timeouts. Add `idle_guard` (under TLS, inside the
/// TLS acceptor) as its acceptor.
pub fn limited_server(
    listener: TcpListener,
    limits: ConnectionLimits,
    max: usize,
) -> Server<PeerAddr> {
    let listener = LimitedListener {
        listener,
        slots: Arc::new(Semaphore::new(max)),
    };
    let mut server =
        Server::<PeerAddr>::from_listener(listener).first_request_timeout(limits.header);
    bound_connections(server.http_builder(), limits);
    server
}

pub fn idle_guard(limits: ConnectionLimits) -> IdleGuard {
    IdleGuard { limits }
}

/// hyper's own bounds. The read buffer: hyper keeps taking body chunks
/// while less than this is buffered for a connection (default ~400 KiB). A
/// blob chunk is 256 KiB or more, so 64 KiB means one chunk at a time: a
/// client that reads slowly holds one chunk, not two (measured under 32
/// concurrent pulls: about 6 MiB less peak RSS, the same CPU). Request
/// heads may still be up to 64 KiB. HTTP/2 gets the same per-stream send
/// buffer.
fn bound_connections(builder: &mut Builder<TokioExecutor>, limits: ConnectionLimits) {
    builder
        .http1()
        .max_buf_size(64 * 1024)
        .header_read_timeout(limits.header);
    builder
        .http2()
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .max_send_buf_size(64 * 1024);
}
