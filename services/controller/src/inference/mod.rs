//! Inference routing: chat and text completions go to the inference workers (`lathe worker
//! --serve`) connected on their Serve stream ([`crate::grpc`]). The controller generates
//! nothing itself.
//!
//! - [`request`] reads an OpenAI request body into what a worker needs, naming the field at
//!   fault; [`response`] turns the worker's pieces back into OpenAI's objects and chunks.
//! - [`Router`] knows the connected servers and what each holds. A request goes to a server
//!   that had its model last (it is probably still loaded), else to the least busy one; a
//!   server never holds more than the `capacity` it announced. When every server is full the
//!   API answers 503 with Retry-After rather than queueing without bound.
//!
//! Each controller replica routes to the servers connected to it; behind a load balancer,
//! run inference workers against each replica (or one replica for inference).

pub mod request;
pub mod response;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lathe_proto::v1::{serve_command, CancelCompletion, Completion, CompletionRequest, ServeCommand, ServeHello};
use tokio::sync::mpsc;

/// The commands of one Serve stream, as the gRPC service sends them.
pub type CommandSender = mpsc::Sender<Result<ServeCommand, tonic::Status>>;

#[derive(Default)]
pub struct Router {
    inner: Mutex<Inner>,
    next_connection: AtomicU64,
}

#[derive(Default)]
struct Inner {
    servers: HashMap<u64, Server>,
    pending: HashMap<String, Pending>,
}

struct Server {
    worker_id: String,
    commands: CommandSender,
    capacity: usize,
    max_models: usize,
    in_flight: usize,
    /// Models sent here, most recent first (at most `max_models`): likely still loaded.
    recent: VecDeque<String>,
}

struct Pending {
    connection: u64,
    pieces: mpsc::UnboundedSender<Completion>,
    choices_left: u32,
}

/// Why a request could not be placed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unplaced {
    /// No inference worker is connected.
    NoServer,
    /// Every server holds as many requests as it can.
    Busy,
}

/// A placed request: its pieces arrive on `pieces`; dropping it (the client went away) cancels
/// the request on its server.
pub struct Placed {
    pub pieces: mpsc::UnboundedReceiver<Completion>,
    pub worker_id: String,
    _guard: Release,
}

struct Release {
    router: Arc<Router>,
    request_id: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.router.abandon(&self.request_id);
    }
}

impl Router {
    /// A server opened its stream; returns the connection's id.
    pub fn connect(&self, worker_id: &str, hello: &ServeHello, commands: CommandSender) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let server = Server {
            worker_id: worker_id.to_string(),
            commands,
            capacity: (hello.capacity.max(hello.max_batch).max(1)) as usize,
            max_models: hello.max_models.max(1) as usize,
            in_flight: 0,
            recent: VecDeque::new(),
        };
        tracing::info!(worker_id, capacity = server.capacity, max_batch = hello.max_batch, "inference worker connected");
        self.lock().servers.insert(id, server);
        id
    }

    /// The stream ended: its requests end too (their receivers see the channel close).
    pub fn disconnect(&self, connection: u64) {
        let mut inner = self.lock();
        if let Some(server) = inner.servers.remove(&connection) {
            tracing::info!(worker_id = server.worker_id, in_flight = server.in_flight, "inference worker disconnected");
        }
        inner.pending.retain(|_, p| p.connection != connection);
    }

    /// Connected servers and the requests they hold, for /readyz and the metrics.
    pub fn load(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.servers.len(), inner.servers.values().map(|s| s.in_flight).sum())
    }

    /// Sends `request` to the best server for its model.
    pub fn place(self: &Arc<Self>, request: CompletionRequest) -> Result<Placed, Unplaced> {
        let mut inner = self.lock();
        if inner.servers.is_empty() {
            return Err(Unplaced::NoServer);
        }
        let model = request.model.clone();
        let chosen = inner
            .servers
            .iter()
            .filter(|(_, s)| s.in_flight < s.capacity && !s.commands.is_closed())
            // Has the model (probably loaded) first, then the least busy.
            .min_by_key(|(id, s)| (!s.recent.contains(&model), s.in_flight, **id))
            .map(|(id, _)| *id)
            .ok_or(Unplaced::Busy)?;
        let server = inner.servers.get_mut(&chosen).expect("chosen among them");
        let request_id = request.request_id.clone();
        let choices = request.n.max(1);
        let command = ServeCommand { body: Some(serve_command::Body::Request(request)) };
        if server.commands.try_send(Ok(command)).is_err() {
            return Err(Unplaced::Busy);
        }
        server.in_flight += 1;
        server.recent.retain(|m| m != &model);
        server.recent.push_front(model);
        server.recent.truncate(server.max_models);
        let worker_id = server.worker_id.clone();
        let (sender, pieces) = mpsc::unbounded_channel();
        inner.pending.insert(request_id.clone(), Pending { connection: chosen, pieces: sender, choices_left: choices });
        Ok(Placed { pieces, worker_id, _guard: Release { router: self.clone(), request_id } })
    }

    /// A piece from the server on `connection`: to its request's receiver. The request is done
    /// when every choice has finished or it failed.
    pub fn deliver(&self, connection: u64, piece: Completion) {
        let mut inner = self.lock();
        let Some(pending) = inner.pending.get_mut(&piece.request_id) else { return };
        if pending.connection != connection {
            return;
        }
        let ends = piece.error.is_some() || {
            if !piece.finish_reason.is_empty() {
                pending.choices_left = pending.choices_left.saturating_sub(1);
            }
            pending.choices_left == 0
        };
        let request_id = piece.request_id.clone();
        let _ = pending.pieces.send(piece);
        if ends {
            inner.pending.remove(&request_id);
            if let Some(server) = inner.servers.get_mut(&connection) {
                server.in_flight = server.in_flight.saturating_sub(1);
            }
        }
    }

    /// The client went away before the end: stop the request on its server.
    fn abandon(&self, request_id: &str) {
        let mut inner = self.lock();
        let Some(pending) = inner.pending.remove(request_id) else { return };
        if let Some(server) = inner.servers.get_mut(&pending.connection) {
            server.in_flight = server.in_flight.saturating_sub(1);
            let cancel = ServeCommand { body: Some(serve_command::Body::Cancel(CancelCompletion { request_id: request_id.into() })) };
            let _ = server.commands.try_send(Ok(cancel));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inference router lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(capacity: u32) -> ServeHello {
        ServeHello { max_batch: 1, capacity, max_models: 2 }
    }

    fn request(id: &str, model: &str) -> CompletionRequest {
        CompletionRequest { request_id: id.into(), model: model.into(), n: 1, ..Default::default() }
    }

    fn finished(id: &str) -> Completion {
        Completion { request_id: id.into(), finish_reason: "stop".into(), ..Default::default() }
    }

    #[test]
    fn requests_follow_their_model_then_spread_and_stop_at_capacity() {
        let router = Arc::new(Router::default());
        assert_eq!(router.place(request("r0", "m")).err(), Some(Unplaced::NoServer));
        let (tx_a, mut rx_a) = mpsc::channel(16);
        let (tx_b, mut rx_b) = mpsc::channel(16);
        let a = router.connect("a", &hello(2), tx_a);
        let _b = router.connect("b", &hello(2), tx_b);
        let first = router.place(request("r1", "m")).unwrap();
        // The model was sent to `first.worker_id`: the next request for it goes there too.
        let second = router.place(request("r2", "m")).unwrap();
        assert_eq!(first.worker_id, second.worker_id);
        // That server is full now; another model, and a third request for m, go to the other.
        let third = router.place(request("r3", "m")).unwrap();
        assert_ne!(third.worker_id, first.worker_id);
        let _fourth = router.place(request("r4", "other")).unwrap();
        assert_eq!(router.place(request("r5", "m")).err(), Some(Unplaced::Busy));
        // A finished request frees its place; a dropped one is cancelled on its server.
        let connection_of_first = if first.worker_id == "a" { a } else { a + 1 };
        router.deliver(connection_of_first, finished("r1"));
        assert!(router.place(request("r6", "m")).is_ok_and(|p| p.worker_id == first.worker_id));
        drop(second);
        let rx = if first.worker_id == "a" { &mut rx_a } else { &mut rx_b };
        let mut cancels = 0;
        while let Ok(Ok(command)) = rx.try_recv() {
            cancels += matches!(command.body, Some(serve_command::Body::Cancel(ref c)) if c.request_id == "r2") as usize;
        }
        assert_eq!(cancels, 1);
        assert_eq!(router.load(), (2, 2));
    }

    #[test]
    fn a_disconnected_server_ends_its_requests() {
        let router = Arc::new(Router::default());
        let (tx, _rx) = mpsc::channel(16);
        let connection = router.connect("a", &hello(4), tx);
        let mut placed = router.place(request("r1", "m")).unwrap();
        router.disconnect(connection);
        assert!(placed.pieces.try_recv().is_err());
        assert!(placed.pieces.is_closed());
        assert_eq!(router.place(request("r2", "m")).err(), Some(Unplaced::NoServer));
    }
}
