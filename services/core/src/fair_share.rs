//! Fair share: which queued job a free worker takes next (docs/scheduling.md).
//!
//! The rule, written once and used by every claim:
//!
//! 1. Higher `priority` first: fair share orders jobs of equal priority only.
//! 2. Then the job that needs more GPUs (best fit): the candidates are the jobs that fit the
//!    claiming worker, so a worker with four GPUs takes a waiting 4-GPU job before any 1-GPU
//!    job, whichever project's. That is the reservation that keeps a stream of small jobs from
//!    starving a big one: every worker large enough for it prefers it, and small jobs only
//!    backfill large workers when nothing larger waits. On a pool of 1-GPU workers it changes
//!    nothing (every candidate asks for one).
//! 3. A job whose project would go over its quota in the pool (`max_gpus`, counted in running
//!    GPUs) is not a candidate at all; it waits, whatever else is idle. Below its quota a
//!    project may borrow any idle capacity: weights order, they do not cap.
//! 4. Among the rest, the project furthest below its share goes first: the lowest
//!    `(running GPUs + recent GPUs) / weight`, where *recent GPUs* is the project's GPU-seconds
//!    in the pool decayed with a half-life, divided by the half-life (a project that ran one
//!    GPU continuously for a long time has `1 / ln 2` of them). Running GPUs make the share
//!    right on a large pool; recent use makes it right on a pool of one worker, where nothing
//!    else is running when the choice is made.
//! 5. Ties, and jobs of one project: the oldest first (FIFO), then the id.
//!
//! Everything here is pure: the store loads [`Candidate`]s and [`ProjectLoad`]s in the claim's
//! transaction and asks [`rank`] for the order to try them in.

use std::cmp::Ordering;
use std::collections::HashMap;

/// What an admin set for a project in a pool (`lathe admin set-project`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    /// Relative share of the pool; 1 unless set. Always > 0.
    pub weight: f64,
    /// Running GPUs the project may hold in the pool at most; `None`: no quota.
    pub max_gpus: Option<u32>,
}

impl Default for Share {
    fn default() -> Share {
        Share { weight: 1.0, max_gpus: None }
    }
}

impl Share {
    /// A weight must be a positive, finite number: the error says why not.
    pub fn check_weight(weight: f64) -> Result<f64, String> {
        if weight.is_finite() && weight > 0.0 && weight <= 1_000_000.0 {
            Ok(weight)
        } else {
            Err(format!("must be a number above 0 and at most 1000000, got {weight}"))
        }
    }
}

/// A project's use of a pool when a claim is made.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProjectLoad {
    /// GPUs of its running jobs in the pool.
    pub running_gpus: u32,
    /// Its decayed GPU-seconds in the pool over the half-life (see the module docs).
    pub recent_gpus: f64,
}

/// A queued job a worker could take.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub project: String,
    pub pool: String,
    pub priority: i16,
    pub gpus: u32,
    /// Queue order within equal priority and share: creation time, any monotonic number.
    pub queued_at: i128,
}

/// A project in a pool: what [`rank`] needs to know of it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProjectState {
    pub share: Share,
    pub load: ProjectLoad,
}

impl ProjectState {
    /// How far the project is above its share: lower goes first.
    pub fn usage_over_weight(&self) -> f64 {
        (f64::from(self.load.running_gpus) + self.load.recent_gpus) / self.share.weight
    }

    /// Whether starting `gpus` more would take the project over its quota.
    pub fn over_quota_with(&self, gpus: u32) -> bool {
        self.share.max_gpus.is_some_and(|max| self.load.running_gpus.saturating_add(gpus) > max)
    }
}

/// The states of projects by `(pool, project)`; a pair without an entry is a project with the
/// default share that uses nothing.
pub type Projects = HashMap<(String, String), ProjectState>;

fn state_of(projects: &Projects, candidate: &Candidate) -> ProjectState {
    projects.get(&(candidate.pool.clone(), candidate.project.clone())).copied().unwrap_or_default()
}

/// The candidates in the order a claim should try them, without those their project's quota
/// excludes. Pure and total: equal inputs give equal orders.
pub fn rank<'a>(candidates: &'a [Candidate], projects: &Projects) -> Vec<&'a Candidate> {
    let mut eligible: Vec<(&Candidate, f64)> = candidates
        .iter()
        .filter_map(|c| {
            let state = state_of(projects, c);
            (!state.over_quota_with(c.gpus)).then(|| (c, state.usage_over_weight()))
        })
        .collect();
    eligible.sort_by(|(a, a_usage), (b, b_usage)| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| b.gpus.cmp(&a.gpus))
            .then_with(|| a_usage.partial_cmp(b_usage).unwrap_or(Ordering::Equal))
            .then_with(|| a.queued_at.cmp(&b.queued_at))
            .then_with(|| a.id.cmp(&b.id))
    });
    eligible.into_iter().map(|(c, _)| c).collect()
}

/// Why a candidate is not ranked, for its `pending_reason`: `Some` when its project's quota
/// holds it back.
pub fn quota_hold(candidate: &Candidate, projects: &Projects) -> Option<String> {
    let state = state_of(projects, candidate);
    state.over_quota_with(candidate.gpus).then(|| {
        format!(
            "project quota in pool {:?}: {} of {} GPUs running, this job needs {}",
            candidate.pool,
            state.load.running_gpus,
            state.share.max_gpus.unwrap_or(0),
            candidate.gpus
        )
    })
}

/// Decayed GPU-seconds of an interval `[start, end]` (seconds before now, `start >= end >= 0`)
/// on `gpus` GPUs, over the half-life: the integral of `gpus · 2^(-age / half_life)` over the
/// interval, divided by the half-life. The store computes the same sum in SQL; this is its
/// reference and what the unit tests check it against.
pub fn recent_gpus(gpus: u32, started_ago: f64, ended_ago: f64, half_life: f64) -> f64 {
    let decay = |age: f64| (-(age / half_life).min(1000.0) * std::f64::consts::LN_2).exp();
    f64::from(gpus) * (decay(ended_ago) - decay(started_ago)) / std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, project: &str, priority: i16, queued_at: i128) -> Candidate {
        Candidate { id: id.into(), project: project.into(), pool: "default".into(), priority, gpus: 1, queued_at }
    }

    fn state(weight: f64, running_gpus: u32, recent_gpus: f64, max_gpus: Option<u32>) -> ProjectState {
        ProjectState { share: Share { weight, max_gpus }, load: ProjectLoad { running_gpus, recent_gpus } }
    }

    fn projects(entries: &[(&str, ProjectState)]) -> Projects {
        entries.iter().map(|(p, s)| (("default".to_string(), p.to_string()), *s)).collect()
    }

    fn ids(ranked: Vec<&Candidate>) -> Vec<&str> {
        ranked.into_iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn a_worker_big_enough_for_a_big_job_takes_it_before_small_ones_of_any_project() {
        // Project a is far over its share and its 4-GPU job is the newest; b's 1-GPU jobs are
        // older and b uses nothing. A 4-GPU worker (both fit it) still takes the 4-GPU job.
        let big = Candidate { gpus: 4, ..job("big", "a", 0, 30) };
        let candidates = [job("small-1", "b", 0, 10), big.clone(), job("small-2", "c", 0, 20)];
        let projects = projects(&[("a", state(1.0, 12, 5.0, None)), ("b", state(1.0, 0, 0.0, None))]);
        let order: Vec<&str> = rank(&candidates, &projects).iter().map(|c| c.id.as_str()).collect();
        assert_eq!(order, ["big", "small-1", "small-2"]);
        // Priority still comes first.
        let urgent = job("urgent", "b", 5, 40);
        let candidates = [big, urgent];
        assert_eq!(rank(&candidates, &projects)[0].id, "urgent");
    }

    #[test]
    fn the_project_below_its_share_goes_first_even_when_its_job_is_younger() {
        let candidates = [job("a3", "a", 0, 3), job("b1", "b", 0, 5)];
        let loads = projects(&[("a", state(1.0, 0, 0.4, None))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["b1", "a3"]);
    }

    #[test]
    fn priority_comes_before_share() {
        let candidates = [job("b1", "b", 0, 1), job("a9", "a", 10, 9)];
        let loads = projects(&[("a", state(1.0, 5, 3.0, None))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["a9", "b1"]);
    }

    #[test]
    fn weights_divide_usage() {
        // a uses three times what b does, with three times the weight: equal, so age decides.
        let candidates = [job("b1", "b", 0, 2), job("a1", "a", 0, 1)];
        let loads = projects(&[("a", state(3.0, 3, 0.0, None)), ("b", state(1.0, 1, 0.0, None))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["a1", "b1"]);
        let loads = projects(&[("a", state(3.0, 4, 0.0, None)), ("b", state(1.0, 1, 0.0, None))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["b1", "a1"]);
    }

    #[test]
    fn a_project_at_its_quota_waits_and_says_why() {
        let mut big = job("a2", "a", 0, 1);
        big.gpus = 2;
        let candidates = [big.clone(), job("b1", "b", 0, 2)];
        let loads = projects(&[("a", state(1.0, 3, 0.0, Some(4)))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["b1"]);
        let reason = quota_hold(&big, &loads).expect("held");
        assert!(reason.contains("3 of 4 GPUs running, this job needs 2"), "{reason}");
        assert_eq!(quota_hold(&candidates[1], &loads), None);
        // Quota 5 admits it: borrowing idle capacity up to the quota is allowed (and on a worker
        // both fit, the 2-GPU job goes first: best fit).
        let loads = projects(&[("a", state(1.0, 3, 0.0, Some(5)))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["a2", "b1"]);
    }

    #[test]
    fn a_zero_quota_stops_a_project_and_no_entry_means_default_share() {
        let candidates = [job("a1", "a", 0, 1), job("c1", "c", 0, 2)];
        let loads = projects(&[("a", state(1.0, 0, 0.0, Some(0)))]);
        assert_eq!(ids(rank(&candidates, &loads)), ["c1"]);
    }

    #[test]
    fn alternating_claims_on_one_worker_follow_the_weights() {
        // One worker, equal jobs of one time unit each, a half-life much longer than the run:
        // the claims made by `rank` give each project starts in proportion to its weight.
        let half_life = 1.0e6;
        let weights = [("a", 3.0), ("b", 1.0)];
        let mut used: HashMap<&str, Vec<(f64, f64)>> = HashMap::new();
        let mut starts: HashMap<&str, u32> = HashMap::new();
        for now in 0..400 {
            let now = f64::from(now);
            let candidates = [job("a", "a", 0, 0), job("b", "b", 0, 1)];
            let loads: Projects = weights
                .iter()
                .map(|(p, w)| {
                    let recent = used
                        .get(p)
                        .map_or(0.0, |intervals| intervals.iter().map(|(s, e)| recent_gpus(1, now - s, now - e, half_life)).sum());
                    (("default".to_string(), p.to_string()), state(*w, 0, recent, None))
                })
                .collect();
            let next = rank(&candidates, &loads)[0].project.clone();
            let project = if next == "a" { "a" } else { "b" };
            used.entry(project).or_default().push((now, now + 1.0));
            *starts.entry(project).or_default() += 1;
        }
        let ratio = f64::from(starts["a"]) / f64::from(starts["b"]);
        assert!((ratio - 3.0).abs() < 0.05, "{starts:?}");
    }

    #[test]
    fn recent_gpus_decays_by_half_each_half_life() {
        let fresh = recent_gpus(2, 10.0, 0.0, 100.0);
        let older = recent_gpus(2, 110.0, 100.0, 100.0);
        assert!((older / fresh - 0.5).abs() < 1e-12);
        // A long continuous run tends to gpus / ln 2.
        let long = recent_gpus(1, 1.0e7, 0.0, 100.0);
        assert!((long - 1.0 / std::f64::consts::LN_2).abs() < 1e-9);
        // Ancient use underflows to nothing rather than to NaN.
        assert_eq!(recent_gpus(1, 1.0e12, 1.0e12 - 5.0, 1.0), 0.0);
    }

    #[test]
    fn bad_weights_are_refused() {
        assert!(Share::check_weight(0.0).is_err());
        assert!(Share::check_weight(-1.0).is_err());
        assert!(Share::check_weight(f64::NAN).is_err());
        assert_eq!(Share::check_weight(2.5), Ok(2.5));
    }
}
