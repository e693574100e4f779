//! The queue against the real Redis at 127.0.0.1:6379. Each test works under a random key
//! prefix and deletes only its own keys, so tests never see each other or anything else on the
//! shared server.

use std::time::{Duration, Instant};

use lathe_queue::{JobId, Queue, QueueError, QueuedJob};
use redis::Commands;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A queue under a fresh prefix; its keys are deleted when it goes out of scope, pass or fail.
struct TestQueue {
    queue: Queue,
    prefix: String,
}

impl TestQueue {
    async fn new() -> TestQueue {
        let prefix = format!("lathe-test-{:016x}:", rand::random::<u64>());
        TestQueue { queue: Queue::open(REDIS_URL, &prefix).await.unwrap(), prefix }
    }

    /// A second, independent queue (its own connections) on the same keys.
    async fn another_client(&self) -> Queue {
        Queue::open(REDIS_URL, &self.prefix).await.unwrap()
    }

    /// Deletes every key under this test's prefix: FLUSHALL, as far as this test can see.
    fn delete_own_keys(&self) {
        let mut connection = redis::Client::open(REDIS_URL).unwrap().get_connection().unwrap();
        let keys: Vec<String> = connection.scan_match(format!("{}*", self.prefix)).unwrap().collect::<Result<_, _>>().unwrap();
        if !keys.is_empty() {
            let _: u64 = redis::cmd("DEL").arg(&keys).query(&mut connection).unwrap();
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        self.delete_own_keys();
    }
}

impl std::ops::Deref for TestQueue {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.queue
    }
}

fn new_job_id() -> JobId {
    JobId::from_random(rand::random())
}

const SHORT: Duration = Duration::from_millis(200);

async fn pop(queue: &Queue, pools: &[&str]) -> Option<QueuedJob> {
    queue.wait_for_job(pools, SHORT).await.unwrap()
}

async fn pop_id(queue: &Queue, pools: &[&str]) -> Option<JobId> {
    pop(queue, pools).await.map(|queued| queued.job_id)
}

#[tokio::test]
async fn higher_priority_pops_first_and_jobs_of_one_priority_pop_in_publish_order() {
    let queue = TestQueue::new().await;
    let jobs: Vec<JobId> = (0..6).map(|_| new_job_id()).collect();
    let priorities = [0, 0, 10, -5, 10, 0];
    for (job, priority) in jobs.iter().zip(priorities) {
        assert!(queue.publish("default", job, priority).await.unwrap());
    }

    let mut popped = Vec::new();
    while let Some(job) = pop_id(&queue, &["default"]).await {
        popped.push(job);
    }

    let expected = [&jobs[2], &jobs[4], &jobs[0], &jobs[1], &jobs[5], &jobs[3]];
    assert_eq!(popped.iter().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn a_job_published_after_its_band_emptied_still_waits_behind_older_jobs_of_its_priority() {
    let queue = TestQueue::new().await;
    let (first, second, third) = (new_job_id(), new_job_id(), new_job_id());
    queue.publish("default", &first, 0).await.unwrap();
    queue.publish("default", &second, 0).await.unwrap();
    assert_eq!(pop_id(&queue, &["default"]).await, Some(first));

    queue.publish("default", &third, 0).await.unwrap();

    assert_eq!(pop_id(&queue, &["default"]).await, Some(second));
    assert_eq!(pop_id(&queue, &["default"]).await, Some(third));
}

#[tokio::test]
async fn republishing_a_job_that_is_already_queued_is_a_no_op() {
    let queue = TestQueue::new().await;
    let (job, other) = (new_job_id(), new_job_id());
    assert!(queue.publish("default", &job, 0).await.unwrap());
    assert!(queue.publish("default", &other, 0).await.unwrap());

    // Not added again, and not moved: not even by a higher priority.
    assert!(!queue.publish("default", &job, 0).await.unwrap());
    assert!(!queue.publish("default", &other, 50).await.unwrap());
    assert_eq!(queue.depth("default").await.unwrap(), 2);

    assert_eq!(pop_id(&queue, &["default"]).await, Some(job));
    assert_eq!(pop_id(&queue, &["default"]).await, Some(other));
    assert_eq!(pop_id(&queue, &["default"]).await, None);
}

#[tokio::test]
async fn a_worker_waiting_on_two_pools_gets_a_job_published_to_either() {
    let queue = TestQueue::new().await;
    let pools = ["a100", "default"];
    let (general, special) = (new_job_id(), new_job_id());

    queue.publish("default", &general, 0).await.unwrap();
    let got = pop(&queue, &pools).await.unwrap();
    assert_eq!((got.pool.as_str(), got.job_id), ("default", general));

    queue.publish("a100", &special, 0).await.unwrap();
    let got = pop(&queue, &pools).await.unwrap();
    assert_eq!((got.pool.as_str(), got.job_id), ("a100", special));
}

#[tokio::test]
async fn a_worker_takes_from_its_first_pool_before_its_second() {
    let queue = TestQueue::new().await;
    let (general, special) = (new_job_id(), new_job_id());
    queue.publish("default", &general, 100).await.unwrap();
    queue.publish("a100", &special, 0).await.unwrap();

    assert_eq!(pop_id(&queue, &["a100", "default"]).await, Some(special));
    assert_eq!(pop_id(&queue, &["a100", "default"]).await, Some(general));
}

#[tokio::test]
async fn waiting_on_empty_pools_times_out_and_returns_none() {
    let queue = TestQueue::new().await;
    let started = Instant::now();

    let got = queue.wait_for_job(&["a100", "default"], Duration::from_millis(300)).await.unwrap();

    assert_eq!(got, None);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "returned after {waited:?}");
    assert!(waited < Duration::from_secs(3), "returned after {waited:?}");
}

#[tokio::test]
async fn depth_counts_the_jobs_waiting_in_each_pool() {
    let queue = TestQueue::new().await;
    for _ in 0..3 {
        queue.publish("default", &new_job_id(), 0).await.unwrap();
    }
    queue.publish("a100", &new_job_id(), 0).await.unwrap();

    assert_eq!(queue.depth("default").await.unwrap(), 3);
    assert_eq!(queue.depth("a100").await.unwrap(), 1);
    assert_eq!(queue.depth("h100").await.unwrap(), 0);

    pop(&queue, &["default"]).await.unwrap();
    assert_eq!(queue.depth("default").await.unwrap(), 2);
}

#[tokio::test]
async fn remove_takes_a_cancelled_job_out_of_its_pool() {
    let queue = TestQueue::new().await;
    let (cancelled, kept) = (new_job_id(), new_job_id());
    queue.publish("default", &cancelled, 10).await.unwrap();
    queue.publish("default", &kept, 0).await.unwrap();
    assert!(queue.contains("default", &cancelled).await.unwrap());

    assert!(queue.remove("default", &cancelled).await.unwrap());

    assert!(!queue.contains("default", &cancelled).await.unwrap());
    assert!(!queue.remove("default", &cancelled).await.unwrap(), "a second remove finds nothing");
    assert_eq!(pop_id(&queue, &["default"]).await, Some(kept));
    assert_eq!(pop_id(&queue, &["default"]).await, None);
}

#[tokio::test]
async fn after_the_queue_keys_are_lost_republishing_makes_the_job_poppable_again() {
    let queue = TestQueue::new().await;
    let job = new_job_id();
    queue.publish("default", &job, 0).await.unwrap();

    queue.delete_own_keys();
    assert!(!queue.contains("default", &job).await.unwrap());
    assert_eq!(queue.depth("default").await.unwrap(), 0);
    assert_eq!(pop_id(&queue, &["default"]).await, None);

    // What the reconciler does for every job still queued in Postgres.
    assert!(queue.publish("default", &job, 0).await.unwrap());
    assert_eq!(pop_id(&queue, &["default"]).await, Some(job));
}

#[tokio::test]
async fn a_waiting_worker_is_woken_within_a_second_of_a_publish_from_another_connection() {
    let queue = TestQueue::new().await;
    let controller = queue.another_client().await;
    let worker = queue.queue.clone();
    let waiting = tokio::spawn(async move {
        let got = worker.wait_for_job(&["a100", "default"], Duration::from_secs(10)).await;
        (got, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the worker should still be blocked");

    let job = new_job_id();
    let published_at = Instant::now();
    controller.publish("default", &job, 0).await.unwrap();

    let (got, woken_at) = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(got.unwrap().map(|queued| queued.job_id), Some(job));
    let latency = woken_at - published_at;
    assert!(latency < Duration::from_secs(1), "woken {latency:?} after the publish");
}

#[tokio::test]
async fn a_blocked_worker_does_not_hold_up_publishes_through_the_same_queue() {
    let queue = TestQueue::new().await;
    let worker = queue.queue.clone();
    let waiting = tokio::spawn(async move { worker.wait_for_job(&["a100"], Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    queue.publish("default", &new_job_id(), 0).await.unwrap();
    assert_eq!(queue.depth("default").await.unwrap(), 1);
    assert!(started.elapsed() < Duration::from_secs(1), "publish took {:?}", started.elapsed());

    waiting.abort();
}

#[tokio::test]
async fn concurrent_waiters_on_one_queue_each_get_a_different_job() {
    let queue = TestQueue::new().await;
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let worker = queue.queue.clone();
            tokio::spawn(async move { worker.wait_for_job(&["default"], Duration::from_secs(10)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut published: Vec<JobId> = (0..3).map(|_| new_job_id()).collect();
    for job in &published {
        queue.publish("default", job, 0).await.unwrap();
    }

    let mut woken = Vec::new();
    for waiter in waiters {
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
        woken.push(got.unwrap().job_id);
    }
    published.sort();
    woken.sort();
    assert_eq!(woken, published);
}

#[tokio::test]
async fn bad_pool_names_and_priorities_are_refused_before_touching_redis() {
    let queue = TestQueue::new().await;
    let job = new_job_id();

    assert!(matches!(queue.publish("A100", &job, 0).await, Err(QueueError::InvalidPool(name)) if name == "A100"));
    assert!(matches!(queue.publish("../x", &job, 0).await, Err(QueueError::InvalidPool(_))));
    assert!(matches!(queue.publish("default", &job, 5000).await, Err(QueueError::PriorityOutOfRange(5000))));
    assert!(matches!(queue.wait_for_job(&["default", "a b"], SHORT).await, Err(QueueError::InvalidPool(_))));
    assert!(matches!(queue.wait_for_job::<&str>(&[], SHORT).await, Err(QueueError::NoPools)));
    assert_eq!(queue.depth("default").await.unwrap(), 0);
}

#[tokio::test]
async fn a_member_that_is_not_a_job_id_is_reported_not_returned() {
    let queue = TestQueue::new().await;
    let mut connection = redis::Client::open(REDIS_URL).unwrap().get_connection().unwrap();
    let key = format!("{}queue:default", queue.prefix);
    let _: u64 = redis::cmd("ZADD").arg(&key).arg(0).arg("not-a-job").query(&mut connection).unwrap();

    let got = queue.wait_for_job(&["default"], SHORT).await;

    assert!(matches!(got, Err(QueueError::MalformedEntry { pool, member }) if pool == "default" && member == "not-a-job"));
}

#[tokio::test]
async fn with_redis_down_every_call_says_unavailable_quickly() {
    // Nothing listens on port 1.
    let queue = Queue::open("redis://127.0.0.1:1", "lathe-test-down:").await.unwrap();
    let job = new_job_id();
    let started = Instant::now();

    let published = queue.publish("default", &job, 0).await;
    let waited = queue.wait_for_job(&["default"], Duration::from_secs(1)).await;
    let depth = queue.depth("default").await;

    assert!(matches!(published, Err(ref e) if e.is_unavailable()), "{published:?}");
    assert!(matches!(waited, Err(ref e) if e.is_unavailable()), "{waited:?}");
    assert!(matches!(depth, Err(ref e) if e.is_unavailable()), "{depth:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn opening_a_queue_with_a_malformed_url_fails() {
    assert!(matches!(Queue::open("not a url", "x:").await, Err(QueueError::InvalidUrl(_))));
}

#[tokio::test]
async fn a_worker_whose_idle_connection_was_dropped_by_redis_still_gets_the_next_job() {
    let queue = TestQueue::new().await;
    assert_eq!(pop(&queue, &["default"]).await, None, "leaves an idle wait connection behind");

    // What a Redis restart does to it; only this test's connections carry this name.
    let mut admin = redis::Client::open(REDIS_URL).unwrap().get_connection().unwrap();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let name = format!("name={}", queue.wait_connection_name());
    let ours: Vec<&str> = clients
        .lines()
        .filter(|line| line.split(' ').any(|field| field == name))
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
        .collect();
    assert_eq!(ours.len(), 1, "{clients}");
    let _: u64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(ours[0]).query(&mut admin).unwrap();

    let job = new_job_id();
    queue.publish("default", &job, 0).await.unwrap();
    assert_eq!(pop_id(&queue, &["default"]).await, Some(job));
}

#[tokio::test]
async fn publishing_many_at_once_adds_only_the_missing_ones_in_the_same_order_as_one_by_one() {
    let queue = TestQueue::new().await;
    let jobs: Vec<JobId> = (0..2500).map(|_| new_job_id()).collect();
    let pool = |i: usize| if i.is_multiple_of(2) { "default" } else { "gpu" };
    let priority = |i: usize| if i % 5 == 4 { 5 } else { 0 };
    // Two already in line: the batch must not move them or count them.
    queue.publish(pool(2), &jobs[2], priority(2)).await.unwrap();
    queue.publish(pool(9), &jobs[9], priority(9)).await.unwrap();
    let batch: Vec<(&str, &JobId, i32)> = jobs.iter().enumerate().map(|(i, job)| (pool(i), job, priority(i))).collect();

    assert_eq!(queue.publish_many(&batch).await.unwrap(), 2498, "every job but the two already queued, across three pipelined chunks");
    assert_eq!(queue.publish_many(&batch).await.unwrap(), 0, "a second pass adds nothing");
    assert_eq!(queue.depth("default").await.unwrap() + queue.depth("gpu").await.unwrap(), 2500);

    // Priority first, then publish order, as `publish` one by one: jobs[2] was first in line.
    let mut popped = Vec::new();
    while let Some(job) = pop_id(&queue, &["default"]).await {
        popped.push(job);
    }
    let in_default = |wanted: i32| (0..2500).filter(move |&i| pool(i) == "default" && priority(i) == wanted && i != 2);
    let mut expected: Vec<JobId> = in_default(5).map(|i| jobs[i].clone()).collect();
    expected.push(jobs[2].clone());
    expected.extend(in_default(0).map(|i| jobs[i].clone()));
    assert_eq!(popped, expected);
}
