//! # How the queue works
//!
//! Postgres decides who runs what; Redis only makes it fast. A job becomes runnable when the
//! controller commits it to Postgres with status `queued`, and it is taken by a worker when the
//! controller's claim (one `UPDATE … WHERE status = 'queued'`, which also bumps the attempt
//! number that fences every later write) succeeds. Nothing here can start a job twice or lose
//! one. What the queue adds is the wake-up: without it an idle worker would poll Postgres every
//! few seconds; with it the worker is blocked in Redis and returns the instant an id lands.
//!
//! ## The keys
//!
//! One sorted set per pool, `{prefix}queue:{pool}` (prefix `lathe:` by default; tests use a
//! random one). Its members are job ids and nothing else: the spec, the attempt, the lease live
//! in Postgres, where the claim reads them. An id carries no state that can go stale, so a
//! member that outlived its job (cancelled, claimed by a polling worker) costs one failed claim
//! and no more.
//!
//! ## Order: priorities, then first in, first out
//!
//! A member's score is `band(priority) · 2^42 + sequence`. Higher priorities get lower bands, and
//! `BZPOPMIN` takes the lowest score, so a priority-10 job goes before any priority-0 job. Within
//! a band the sequence is one more than the newest member of that band, computed by a Lua script
//! in the same step as the `ZADD NX` (see [`PUBLISH_SCRIPT`]): an enqueue clock that never ties
//! and needs no agreement between the clocks of several controllers. 2048 bands of 2^42 keep
//! every score below 2^53, exact in Redis's doubles.
//!
//! ## Publishing is idempotent
//!
//! [`Queue::publish`] is `ZADD NX`: publishing an id that is already in the pool changes
//! nothing, not even its place in line. So the reconciler can publish every queued job of
//! Postgres on each pass without reading Redis first, and a controller that crashed between its
//! commit and its publish is covered by the next pass.
//!
//! ## Waiting: at-least-once wake-up
//!
//! A worker calls [`Queue::wait_for_job`] with its pools in order of preference, e.g.
//! `["a100", "default"]`. That is one `BZPOPMIN` over those keys: Redis returns the best member
//! of the first non-empty pool, or blocks until any of them gets one, or times out. The pop
//! removes the id, so two idle workers are not both woken for one job. The worker then asks the
//! controller to claim it. An id can still be delivered when there is nothing to run (the job
//! was cancelled or claimed meanwhile: the claim fails and the worker waits again), and a
//! wake-up can be lost (the worker died between the pop and the claim, or its wait was
//! cancelled as Redis answered): the job is still `queued` in Postgres, no longer in Redis, and
//! the reconciler publishes it again. Late, never lost.
//!
//! Blocking commands hold their connection: a `BZPOPMIN` on a shared multiplexed connection
//! would stall every `publish` behind it. So waits run on connections of their own, one per
//! concurrent waiter, kept in a small idle list; all other commands share one
//! [`ConnectionManager`], which reconnects by itself.
//!
//! ## Redis restarts, FLUSHALL, outages
//!
//! A restart without persistence, a `FLUSHALL` or a failover empties the sorted sets. Nothing
//! is lost: the reconciler calls `publish` again for every job that is `queued` in Postgres
//! (ordered by priority, then age, so the line is rebuilt as it was), and duplicates are
//! harmless because the claim is a compare-and-set. While Redis is down every call returns
//! [`QueueError::Unavailable`] within a couple of seconds; the controller keeps accepting jobs
//! and workers fall back to polling Postgres for a claim, then try Redis again.
//!
//! ## Limits
//!
//! Keys of several pools must live on one Redis node for the multi-key `BZPOPMIN`: a single
//! server or a replicated primary, not Redis Cluster.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncCommands, AsyncConnectionConfig, Client, RedisError, Script};
use lathe_core::JobId;

use crate::pool::{priority_band, Pool};
use crate::QueueError;

/// The key prefix in production. Keys are `{prefix}queue:{pool}`.
pub const DEFAULT_KEY_PREFIX: &str = "lathe:";

/// How long to wait for Redis to accept a connection before calling it unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a non-blocking command may take before Redis is called unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra time a blocking wait is given past its own timeout before the connection is presumed
/// dead (a half-open TCP connection never answers).
const WAIT_GRACE: Duration = Duration::from_secs(5);
/// Redis blocks forever on a timeout of 0: the shortest wait we send is this.
const SHORTEST_WAIT: Duration = Duration::from_millis(1);
/// Idle wait connections kept for reuse; more concurrent waiters open more and close the extra.
const MAX_IDLE_WAIT_CONNECTIONS: usize = 16;

/// `ZADD NX` with the next sequence number of the job's priority band.
///
/// KEYS[1] the pool's sorted set; ARGV[1] the job id; ARGV[2], ARGV[3] the band `[start, end)`.
/// Returns 1 when added, 0 when the id was already there. Numbers cross into `ZADD` through
/// `%.0f`: Redis turns a Lua number into a string with 14 significant digits, which would round
/// scores above 10^14.
pub const PUBLISH_SCRIPT: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local newest = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], ARGV[2], 'WITHSCORES', 'LIMIT', 0, 1)
local score = tonumber(ARGV[2])
if newest[2] then
  score = tonumber(newest[2]) + 1
end
if score >= tonumber(ARGV[3]) then
  return redis.error_reply('ERR priority band of ' .. KEYS[1] .. ' is full')
end
redis.call('ZADD', KEYS[1], 'NX', string.format('%.0f', score), ARGV[1])
return 1
";

/// A job id popped for a worker, and the pool it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub pool: Pool,
    pub job_id: JobId,
}

/// The Redis side of dispatch. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Queue {
    client: Client,
    /// Every non-blocking command; reconnects in the background after Redis comes back.
    commands: ConnectionManager,
    /// Connections for `BZPOPMIN`, one per concurrent waiter, returned here after a clean wait.
    idle_wait_connections: Arc<Mutex<Vec<MultiplexedConnection>>>,
    publish_script: Arc<Script>,
    /// Prepended to every key, so tests (and several installations) can share one Redis.
    key_prefix: Arc<str>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("key_prefix", &self.key_prefix).finish_non_exhaustive()
    }
}

impl Queue {
    /// A queue on the Redis at `redis_url` (`redis://host:port/db`), its keys under
    /// `key_prefix`. Connects lazily: Redis being down now is not an error, so the controller
    /// and workers start anyway and poll Postgres until it is back. Fails only on a bad URL.
    /// `rediss://` URLs speak TLS, verified against the system's roots (`SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` add a private CA, as for OpenSSL).
    pub async fn open(redis_url: &str, key_prefix: &str) -> Result<Queue, QueueError> {
        crate::install_tls_provider();
        let client = Client::open(redis_url).map_err(QueueError::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Queue {
            client,
            commands,
            idle_wait_connections: Arc::new(Mutex::new(Vec::new())),
            publish_script: Arc::new(Script::new(PUBLISH_SCRIPT)),
            key_prefix: key_prefix.into(),
        })
    }

    /// The sorted set holding `pool`'s job ids.
    pub fn pool_key(&self, pool: &Pool) -> String {
        format!("{}queue:{}", self.key_prefix, pool)
    }

    /// Puts `job_id` in line in `pool`. Returns false, and changes nothing, when it was already
    /// there. Call it after the job is committed as `queued` in Postgres.
    pub async fn publish(&self, pool: &str, job_id: &JobId, priority: i32) -> Result<bool, QueueError> {
        let key = self.pool_key(&Pool::parse(pool)?);
        let (band_start, band_end) = priority_band(priority)?;
        let added: i64 = self
            .publish_script
            .key(key)
            .arg(job_id.as_str())
            .arg(band_start)
            .arg(band_end)
            .invoke_async(&mut self.commands.clone())
            .await?;
        Ok(added == 1)
    }

    /// [`Queue::publish`] for many jobs, in pipelined round trips of a thousand: what the
    /// reconciler uses to put every queued job back in line each pass. Returns how many were
    /// missing and added.
    pub async fn publish_many(&self, jobs: &[(&str, &JobId, i32)]) -> Result<u64, QueueError> {
        let mut added = 0u64;
        for chunk in jobs.chunks(1000) {
            let mut invocations = Vec::with_capacity(chunk.len());
            for (pool, job_id, priority) in chunk {
                let key = self.pool_key(&Pool::parse(pool)?);
                let (band_start, band_end) = priority_band(*priority)?;
                let mut invocation = self.publish_script.key(key);
                invocation.arg(job_id.as_str()).arg(band_start).arg(band_end);
                invocations.push(invocation);
            }
            let mut pipe = ::redis::pipe();
            pipe.load_script(&self.publish_script).ignore();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let results: Vec<i64> = pipe.query_async(&mut self.commands.clone()).await?;
            added += results.iter().filter(|&&r| r == 1).count() as u64;
        }
        Ok(added)
    }

    /// Blocks until a job id is in one of `pools` (earlier pools preferred) and pops it, or
    /// returns `None` after `timeout`. The caller then claims the job in Postgres; a failed
    /// claim just means waiting again.
    pub async fn wait_for_job<P: AsRef<str>>(&self, pools: &[P], timeout: Duration) -> Result<Option<QueuedJob>, QueueError> {
        let pools = pools.iter().map(|pool| Pool::parse(pool.as_ref())).collect::<Result<Vec<_>, _>>()?;
        if pools.is_empty() {
            return Err(QueueError::NoPools);
        }
        let keys: Vec<String> = pools.iter().map(|pool| self.pool_key(pool)).collect();
        let wait = timeout.max(SHORTEST_WAIT);

        let popped = match self.take_idle_wait_connection() {
            // An idle connection may have died with a Redis restart since it was last used:
            // then one retry on a fresh connection, so a restart does not cost a wake-up.
            Some(idle) => match self.pop_min_blocking(idle, &keys, wait).await {
                Err(error) if error.is_unavailable() => self.pop_min_blocking(self.open_wait_connection().await?, &keys, wait).await?,
                other => other?,
            },
            None => self.pop_min_blocking(self.open_wait_connection().await?, &keys, wait).await?,
        };

        let Some((key, member, _score)) = popped else {
            return Ok(None);
        };
        let pool = pools.into_iter().zip(keys).find_map(|(pool, k)| (k == key).then_some(pool));
        let pool = pool.ok_or_else(|| QueueError::MalformedEntry { pool: key.clone(), member: member.clone() })?;
        match JobId::parse(&member) {
            Ok(job_id) => Ok(Some(QueuedJob { pool, job_id })),
            Err(_) => Err(QueueError::MalformedEntry { pool: pool.to_string(), member }),
        }
    }

    /// Takes `job_id` out of `pool` (on cancel or pause). Returns whether it was there.
    pub async fn remove(&self, pool: &str, job_id: &JobId) -> Result<bool, QueueError> {
        let key = self.pool_key(&Pool::parse(pool)?);
        let removed: u64 = self.commands.clone().zrem(key, job_id.as_str()).await?;
        Ok(removed == 1)
    }

    /// Whether `job_id` is waiting in `pool`.
    pub async fn contains(&self, pool: &str, job_id: &JobId) -> Result<bool, QueueError> {
        let key = self.pool_key(&Pool::parse(pool)?);
        let score: Option<f64> = self.commands.clone().zscore(key, job_id.as_str()).await?;
        Ok(score.is_some())
    }

    /// How many job ids wait in `pool`: the queue-depth gauge, and what KEDA scales on.
    pub async fn depth(&self, pool: &str) -> Result<u64, QueueError> {
        let key = self.pool_key(&Pool::parse(pool)?);
        Ok(self.commands.clone().zcard(key).await?)
    }

    /// Round trip to Redis, for readiness checks.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = ::redis::cmd("PING").query_async(&mut self.commands.clone()).await?;
        Ok(())
    }

    /// `BZPOPMIN` on a connection of its own. A connection that errs or is abandoned mid-wait
    /// (this future dropped) is never put back: its reply may still be on the wire.
    async fn pop_min_blocking(
        &self,
        mut connection: MultiplexedConnection,
        keys: &[String],
        wait: Duration,
    ) -> Result<Option<(String, String, f64)>, QueueError> {
        let reply = connection.bzpopmin(keys, wait.as_secs_f64());
        let popped = match tokio::time::timeout(wait + WAIT_GRACE, reply).await {
            Ok(reply) => reply?,
            Err(_) => return Err(QueueError::Unavailable(wait_timed_out())),
        };
        self.return_wait_connection(connection);
        Ok(popped)
    }

    fn take_idle_wait_connection(&self) -> Option<MultiplexedConnection> {
        self.idle_wait_connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop()
    }

    async fn open_wait_connection(&self) -> Result<MultiplexedConnection, QueueError> {
        // No response timeout: the wait itself decides how long the reply may take.
        let config = AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT)).set_response_timeout(None);
        let mut connection = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        // Named so that operators (and tests) can tell a blocked worker in CLIENT LIST. A server
        // whose ACL forbids it still works, unnamed.
        let _: Result<(), RedisError> =
            ::redis::cmd("CLIENT").arg("SETNAME").arg(self.wait_connection_name()).query_async(&mut connection).await;
        Ok(connection)
    }

    /// `{prefix}queue-wait`, with anything Redis refuses in a client name replaced by `_`.
    pub fn wait_connection_name(&self) -> String {
        let name = format!("{}queue-wait", self.key_prefix);
        name.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
    }

    fn return_wait_connection(&self, connection: MultiplexedConnection) {
        let mut idle = self.idle_wait_connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_WAIT_CONNECTIONS {
            idle.push(connection);
        }
    }
}

fn wait_timed_out() -> RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "redis did not answer a blocking wait").into()
}
