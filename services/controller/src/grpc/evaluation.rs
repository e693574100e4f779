//! The worker's side of evaluations: claim (with everything needed to load the model and the
//! items), progress and lease renewal from heartbeats, and the fenced finish or failure.

use lathe_proto::v1::{
    ClaimEvaluationRequest, ClaimEvaluationResponse, EvaluationProgress, EvaluationRef, FailEvaluationRequest, FailureClass,
    FinishEvaluationRequest,
};
use lathe_store::evaluations::{self, EvaluationClaim, EvaluationFailure};
use lathe_store::files::get_file;
use lathe_store::jobs::{get_job_unscoped, JobError};
use lathe_store::StoreError;
use tonic::Status;

use super::{file_ref, millis, status};
use crate::adapters::model_adapter;
use crate::AppState;

pub async fn claim(state: &AppState, worker_id: &str, request: ClaimEvaluationRequest) -> Result<ClaimEvaluationResponse, Status> {
    let id = Some(request.evaluation_id.as_str()).filter(|id| !id.is_empty());
    let claim = evaluations::claim_evaluation(&state.pool, worker_id, id, state.config.lease)
        .await
        .map_err(status)?
        .ok_or_else(|| Status::not_found("no evaluation to claim"))?;
    let evaluation = &claim.evaluation;
    match describe(state, &claim).await {
        Ok(response) => {
            tracing::info!(evaluation_id = %evaluation.id, attempt = evaluation.attempt, worker_id, model = evaluation.model, "evaluation claimed");
            Ok(response)
        }
        Err(error) => {
            // The claim is committed but the worker will not get to run it. Inputs that are gone
            // fail it now rather than let every worker trip over it; a passing database error
            // hands it back to the queue for free.
            let gone = error.code == "file_not_found";
            let failure = if gone { EvaluationFailure::BadInput(error.clone()) } else { EvaluationFailure::Preempted };
            let released = evaluations::fail_evaluation(
                &state.pool,
                evaluation.id.as_str(),
                evaluation.attempt,
                worker_id,
                failure,
                &state.config.retry,
            )
            .await;
            if let Err(e) = released {
                tracing::warn!(evaluation_id = %evaluation.id, error = %e, "could not release a half-done evaluation claim; its lease will expire");
            }
            Err(if gone {
                Status::aborted("the evaluation's inputs are gone; evaluation failed")
            } else {
                Status::unavailable(error.message)
            })
        }
    }
}

/// Everything the worker needs, or why the evaluation cannot run.
async fn describe(state: &AppState, claim: &EvaluationClaim) -> Result<ClaimEvaluationResponse, JobError> {
    let evaluation = &claim.evaluation;
    let gone = |param: &str, message: String| JobError { code: "file_not_found".into(), message, param: Some(param.into()) };
    let internal = |e: StoreError| JobError { code: "server_error".into(), message: e.to_string(), param: None };
    let (base_model, adapter_files) = match &evaluation.job_id {
        None => (evaluation.model.clone(), Vec::new()),
        Some(job_id) => {
            let job_id = lathe_core::JobId::parse(job_id).map_err(|e| JobError {
                code: "server_error".into(),
                message: e.to_string(),
                param: None,
            })?;
            let job = get_job_unscoped(&state.pool, &job_id).await.map_err(internal)?;
            let adapter = model_adapter(state, &evaluation.project_id, &job, &evaluation.model)
                .await
                .map_err(internal)?
                .ok_or_else(|| gone("model", format!("the adapter files of {} were deleted", evaluation.model)))?;
            (job.spec.model.to_string(), adapter)
        }
    };
    let file = match &evaluation.spec.file {
        None => None,
        Some(id) => {
            let stored = get_file(&state.pool, &evaluation.project_id, id).await.map_err(|e| match e {
                StoreError::NotFound => gone("file", format!("the file {id} was deleted before the evaluation could run")),
                other => internal(other),
            })?;
            Some(file_ref(state, &stored))
        }
    };
    Ok(ClaimEvaluationResponse {
        evaluation_id: evaluation.id.as_str().to_string(),
        attempt: evaluation.attempt as u32,
        spec_json: serde_json::to_string(&evaluation.spec).map_err(|e| JobError {
            code: "server_error".into(),
            message: e.to_string(),
            param: None,
        })?,
        model: evaluation.model.clone(),
        base_model,
        adapter_files,
        file,
        lease_expires_at_unix_ms: millis(claim.lease_expires_at),
    })
}

/// Renews the leases of the evaluations a heartbeat lists; returns those the worker lost.
pub async fn renew(state: &AppState, worker_id: &str, running: Vec<EvaluationProgress>) -> Result<Vec<EvaluationRef>, StoreError> {
    let mut lost = Vec::new();
    for progress in running {
        let counts = (progress.items_total > 0).then_some((progress.items_done as i32, progress.items_total as i32));
        let renewed = evaluations::renew_evaluation_lease(
            &state.pool,
            &progress.evaluation_id,
            progress.attempt as i32,
            worker_id,
            state.config.lease,
            counts,
        )
        .await;
        match renewed {
            Ok(_) => {}
            Err(StoreError::StaleAttempt { .. }) | Err(StoreError::NotFound) => {
                lost.push(EvaluationRef { evaluation_id: progress.evaluation_id, attempt: progress.attempt })
            }
            Err(other) => return Err(other),
        }
    }
    Ok(lost)
}

pub async fn finish(state: &AppState, worker_id: &str, request: FinishEvaluationRequest) -> Result<(), Status> {
    let result: serde_json::Value =
        serde_json::from_str(&request.result_json).map_err(|e| Status::invalid_argument(format!("result_json: {e}")))?;
    if !result.get("accuracy").is_some_and(|a| a.is_number()) {
        return Err(Status::invalid_argument("result_json: no accuracy"));
    }
    let result = super::wire::storable_json(result);
    let items = super::wire::evaluation_items(request.items)?;
    let evaluation =
        evaluations::finish_evaluation(&state.pool, &request.evaluation_id, request.attempt as i32, worker_id, &result, &items)
            .await
            .map_err(status)?;
    tracing::info!(
        evaluation_id = %evaluation.id,
        model = evaluation.model,
        benchmark = %evaluation.spec.benchmark,
        accuracy = result["accuracy"].as_f64(),
        items = items.len(),
        "evaluation succeeded"
    );
    Ok(())
}

pub async fn fail(state: &AppState, worker_id: &str, request: FailEvaluationRequest) -> Result<(), Status> {
    let reported = super::wire::reported_error(&request.code, &request.message);
    let failure = match FailureClass::try_from(request.class).unwrap_or(FailureClass::Unspecified) {
        FailureClass::BadInput => EvaluationFailure::BadInput(reported.clone()),
        // Not the evaluation's fault: back to the queue for free.
        FailureClass::Preempted | FailureClass::Infrastructure => EvaluationFailure::Preempted,
        FailureClass::Crash | FailureClass::Unspecified => {
            EvaluationFailure::Crashed { reason: format!("{}: {}", reported.code, reported.message) }
        }
    };
    let evaluation =
        evaluations::fail_evaluation(&state.pool, &request.evaluation_id, request.attempt as i32, worker_id, failure, &state.config.retry)
            .await
            .map_err(status)?;
    tracing::warn!(evaluation_id = %evaluation.id, code = reported.code, message = request.message, status = evaluation.status.as_str(), "evaluation attempt failed");
    Ok(())
}
