//! `lathe worker --serve`: an inference server instead of a trainer. It keeps one Serve stream
//! open to the controller, which sends it chat and text completion requests routed by model;
//! the [`engine`] thread generates them in batches, and every piece of text goes back up the
//! stream as it is made.
//!
//! ```text
//! controller ══ServeCommand (request, cancel)══▶ stream loop ──Command──▶ engine thread (device)
//!            ◀══ServeMessage (hello, completion)══            ◀──Completion── batches, one step each
//! ```
//!
//! When the stream breaks, the controller has already failed the requests it sent here; the
//! engine drops them too, and the loop reconnects.

pub mod engine;

use std::time::Duration;

use lathe_proto::v1::{serve_command, serve_message, ServeHello, ServeMessage};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::client::Client;
use crate::telemetry::WorkerMetrics;
use crate::{WorkerConfig, WorkerError};
use engine::{Command, EngineConfig};

const RETRY: Duration = Duration::from_secs(2);

/// How a serving worker batches and queues.
#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// Sequences generated together in one batch.
    pub max_batch: usize,
    /// Requests held at once (generating or waiting); the controller sends no more.
    pub capacity: usize,
    /// Models kept loaded.
    pub max_models: usize,
    /// Special tokens in message contents become plain text (no forged turns).
    pub escape_special_tokens: bool,
}

/// Serves completions until `shutdown`.
pub async fn run(
    mut client: Client,
    config: &WorkerConfig,
    serve: ServeConfig,
    metrics: &WorkerMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let (events, mut completions) = mpsc::unbounded_channel();
    let observer = metrics.batch_observer();
    let engine = engine::start(
        EngineConfig {
            models_root: config.models_root.clone(),
            device: config.device.clone(),
            dtype: config.dtype.clone(),
            threads: config.threads,
            max_batch: serve.max_batch,
            max_models: serve.max_models,
            escape_special_tokens: serve.escape_special_tokens,
        },
        events,
        Box::new(observer),
    );
    let hello = ServeMessage {
        body: Some(serve_message::Body::Hello(ServeHello {
            max_batch: serve.max_batch as u32,
            capacity: serve.capacity as u32,
            max_models: serve.max_models as u32,
        })),
    };
    tracing::info!(max_batch = serve.max_batch, capacity = serve.capacity, max_models = serve.max_models, "serving completions");
    while !*shutdown.borrow() {
        let (outbound, outbox) = mpsc::channel(1024);
        outbound.send(hello.clone()).await.expect("the receiver is here");
        let mut inbound = match client.serve(ReceiverStream::new(outbox)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::Unauthenticated => return Err(WorkerError::Unauthenticated(status.message().into())),
            Err(status) => {
                tracing::warn!(%status, "could not open the Serve stream; retrying");
                tokio::select! { _ = tokio::time::sleep(RETRY) => {}, _ = shutdown.changed() => {} }
                continue;
            }
        };
        tracing::info!("Serve stream open");
        loop {
            tokio::select! {
                command = inbound.message() => match command {
                    Ok(Some(command)) => {
                        let command = match command.body {
                            Some(serve_command::Body::Request(request)) => Command::Submit(Box::new(request)),
                            Some(serve_command::Body::Cancel(cancel)) => Command::Cancel(cancel.request_id),
                            None => continue,
                        };
                        if engine.send(command).is_err() {
                            return Err(WorkerError::Setting { field: "serve", message: "the inference thread stopped".into() });
                        }
                    }
                    Ok(None) => { tracing::warn!("the controller closed the Serve stream"); break }
                    Err(status) => { tracing::warn!(%status, "Serve stream broken"); break }
                },
                Some(completion) = completions.recv() => {
                    let message = ServeMessage { body: Some(serve_message::Body::Completion(completion)) };
                    if outbound.send(message).await.is_err() {
                        break;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        let _ = engine.send(Command::CancelAll);
        if !*shutdown.borrow() {
            tokio::select! { _ = tokio::time::sleep(RETRY) => {}, _ = shutdown.changed() => {} }
        }
    }
    Ok(())
}
