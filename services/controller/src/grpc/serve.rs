//! The Serve stream of an inference worker: its hello says what it can hold, then the
//! [`Router`](crate::inference::Router) sends it requests and this task hands its pieces back
//! to the waiting API requests. When the stream ends, so do the requests it held.

use std::time::Duration;

use lathe_proto::v1::{serve_message, ServeCommand, ServeMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::AppState;

/// How long a new stream may take to say hello.
const HELLO_WITHIN: Duration = Duration::from_secs(30);

pub async fn open(
    state: AppState,
    worker_id: String,
    mut inbound: Streaming<ServeMessage>,
) -> Result<ReceiverStream<Result<ServeCommand, Status>>, Status> {
    let first = tokio::time::timeout(HELLO_WITHIN, inbound.message()).await.map_err(|_| Status::deadline_exceeded("no ServeHello"))??;
    let Some(ServeMessage { body: Some(serve_message::Body::Hello(hello)) }) = first else {
        return Err(Status::invalid_argument("the first message of a Serve stream must be ServeHello"));
    };
    let (commands, outbox) = mpsc::channel(1024);
    let router = state.inference.clone();
    let connection = router.connect(&worker_id, &hello, commands);
    let mut revoked = state.revocations.watch(&worker_id);
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = inbound.message() => message,
                () = revoked.revoked() => break,
            };
            match message {
                Ok(Some(ServeMessage { body: Some(serve_message::Body::Completion(piece)) })) => router.deliver(connection, piece),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(status) => {
                    // Also how a frozen or vanished worker ends: its connection missed the
                    // keepalive pings and was closed.
                    tracing::warn!(worker_id, %status, "Serve stream broken");
                    break;
                }
            }
        }
        // Its requests end (503 to their clients), and it takes no more.
        router.disconnect(connection);
    });
    Ok(ReceiverStream::new(outbox))
}
