//! A TCP forwarder on 127.0.0.1 that counts the bytes flowing from its target back to clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::server::BackgroundServer;

const BUFFER_SIZE: usize = 64 * 1024;

#[derive(Default)]
struct Counters {
    bytes_to_clients: AtomicU64,
    connections: AtomicUsize,
}

/// Forwards every connection to `target`; stops (closing all connections) on drop.
pub struct CountingForwarder {
    server: BackgroundServer,
    counters: Arc<Counters>,
}

impl CountingForwarder {
    pub fn start(target: SocketAddr) -> Self {
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let server = BackgroundServer::spawn("counting-forwarder", move |listener| {
            accept_loop(listener, target, shared)
        });
        Self { server, counters }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Bytes written from the target to clients so far.
    pub fn bytes_served(&self) -> u64 {
        self.counters.bytes_to_clients.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Closes the listener and every forwarded connection.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, counters: Arc<Counters>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counters.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(forward(client, target, Arc::clone(&counters)));
    }
}

/// Relays one connection; if the target refuses, the client connection is simply closed.
async fn forward(client: TcpStream, target: SocketAddr, counters: Arc<Counters>) {
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let _ = tokio::join!(
        pump(client_read, upstream_write, None),
        pump(
            upstream_read,
            client_write,
            Some(&counters.bytes_to_clients)
        ),
    );
}

/// Copies until EOF, then half-closes the writer; adds every written chunk to `counter`.
async fn pump(
    mut reader: impl AsyncRead + Unpin,
    mut writer: impl AsyncWrite + Unpin,
    counter: Option<&AtomicU64>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buffer[..n]).await?;
        if let Some(counter) = counter {
            counter.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}
