//! Lingering close: when the gateway closes a connection, the client still gets the last
//! thing it was told.
//!
//! Closing a socket that has unread input makes the kernel answer with a reset instead of a
//! normal close, and a reset makes the client's kernel throw away whatever the client had not
//! read yet: the `error` and the close frame that said why (4004 after a flood, 1009, a ban),
//! or the 431 for an oversized request head. So every accepted socket is a
//! [`LingeringStream`]: when it is dropped while the client may still be sending (no end of
//! stream seen), it is not closed at once but handed to a small task that half-closes it
//! (what was sent, then end of stream) and reads and discards the client's input until the
//! client closes too, or for at most [`LINGER_TIME`] and [`LINGER_BYTES`], so that a hostile
//! client cannot hold it. At most as many sockets linger at once as the listener may have
//! pending connections; beyond that a socket is closed at once, as without lingering.
//!
//! Lingering tasks are tracked with the server's other tasks, so a graceful shutdown waits for
//! them (within the drain timeout) and the last close frames reach the clients.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// Longest time a closed socket keeps reading the client's input.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Most input read and discarded from a closed socket.
pub const LINGER_BYTES: usize = 256 * 1024;

/// What lingering sockets share: the cap on how many linger at once, and the task tracker.
pub struct Lingering {
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Lingering {
    /// At most `max` sockets linger at once; their tasks run on `tasks`.
    pub fn new(max: usize, tasks: TaskTracker) -> Arc<Self> {
        Arc::new(Lingering {
            slots: Arc::new(Semaphore::new(max)),
            tasks,
        })
    }

    pub fn wrap(self: &Arc<Self>, stream: TcpStream) -> LingeringStream {
        LingeringStream {
            stream: Some(stream),
            ended: false,
            lingering: self.clone(),
        }
    }
}

/// A TCP stream that lingers when dropped. See the module docs.
pub struct LingeringStream {
    /// `Some` until dropped.
    stream: Option<TcpStream>,
    /// The client's end of stream was read: there is nothing left to drain.
    ended: bool,
    lingering: Arc<Lingering>,
}

impl LingeringStream {
    /// Writes what fits in the socket buffer without waiting.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.stream
            .as_ref()
            .expect("the stream is there until drop")
            .try_write(data)
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is there until drop"),
        )
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.ended {
            return;
        }
        // Without a slot, or without a runtime (the process is shutting down), the socket
        // closes at once.
        let Ok(slot) = self.lingering.slots.clone().try_acquire_owned() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.lingering
            .tasks
            .spawn_on(linger(stream, slot), &runtime);
    }
}

async fn linger(mut stream: TcpStream, _slot: OwnedSemaphorePermit) {
    // The client reads what was sent, then the end of stream; it closes its side in turn.
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut discard = [0u8; 2048];
    let mut left = LINGER_BYTES;
    let drain = async {
        while left > 0 {
            match stream.read(&mut discard).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let polled = self.stream().poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && wanted && buf.filled().len() == before {
            self.ended = true;
        }
        polled
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|stream| stream.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected pair: the server side wrapped, the client side plain.
    async fn pair(lingering: &Arc<Lingering>) -> (LingeringStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (lingering.wrap(server), client)
    }

    #[tokio::test]
    async fn unread_input_does_not_cost_the_client_the_last_words() {
        let tasks = TaskTracker::new();
        let lingering = Lingering::new(8, tasks.clone());
        let (mut server, mut client) = pair(&lingering).await;
        // The client sends more than the server will ever read, the server answers and
        // closes without reading.
        client.write_all(&[b'x'; 64 * 1024]).await.unwrap();
        server.write_all(b"goodbye").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("no reset");
        assert_eq!(got, b"goodbye");
        drop(client);
        tasks.close();
        tokio::time::timeout(LINGER_TIME * 5, tasks.wait())
            .await
            .expect("the lingering task ends once the client has closed");
    }

    #[tokio::test]
    async fn a_client_that_closed_first_is_not_lingered_over() {
        let tasks = TaskTracker::new();
        let lingering = Lingering::new(8, tasks.clone());
        let (mut server, client) = pair(&lingering).await;
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        drop(server);
        assert!(tasks.is_empty());
    }
}
