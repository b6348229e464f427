//! A loopback TCP server running on its own thread and tokio runtime, shut down on drop.

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::net::bind_loopback;

pub struct BackgroundServer {
    name: String,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    /// Binds 127.0.0.1 on a kernel-chosen port, then runs `serve(listener)` on a new thread with a
    /// current-thread runtime until the server is stopped. Stopping drops the runtime, which cancels
    /// every task `serve` spawned (closing their sockets).
    pub fn spawn<F, Fut>(name: &str, serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let listener = bind_loopback();
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(listener, serve, stopped))
            .expect("spawn server thread");
        Self {
            name: name.to_owned(),
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and joins its thread. Idempotent.
    pub fn stop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: background server {} panicked", self.name);
        }
    }
}

fn run<F, Fut>(listener: std::net::TcpListener, serve: F, stopped: oneshot::Receiver<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build server runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        tokio::select! {
            () = serve(listener) => {}
            _ = stopped => {}
        }
    });
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.stop();
    }
}
