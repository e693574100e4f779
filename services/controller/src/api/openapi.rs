//! The OpenAPI 3.1 document of the REST API, served at `/v1/openapi.json` and kept in the repo as
//! `docs/openapi.json` (`lathe-controller --print-openapi`; a test compares the two). It is
//! checked against the running API by schemathesis (`tests/service/test_openapi.py`): every
//! response must match it and none may be a 5xx, so it cannot drift from what `api::views`
//! renders. Routes are listed here in the order of `api::router`.

use serde_json::{json, Value};

/// The document. `info.version` is the crate's version.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Lathe",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fine-tuning service with OpenAI's /v1/files, /v1/fine_tuning/jobs and /v1/chat/completions API, plus evaluations and metrics.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": merged(merged(schemas(), admin_schemas()), completion_schemas()),
            "responses": {
                "Error": {"description": "An error in OpenAI's envelope", "content": json_of("#/components/schemas/Error")},
            },
            "parameters": {
                "After": {"name": "after", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 64},
                          "description": "Cursor: the id of the last object of the previous page"},
                "Limit": {"name": "limit", "in": "query", "required": false,
                          "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                "JobId": {"name": "id", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 64}},
                "FileId": {"name": "id", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 64}},
                "EvaluationId": {"name": "id", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 64}},
            },
        },
    })
}

fn json_of(schema: &str) -> Value {
    json!({"application/json": {"schema": {"$ref": schema}}})
}

fn ok(schema: &str) -> Value {
    json!({"description": "OK", "content": json_of(schema)})
}

/// The error statuses an operation can answer with (all in the envelope).
fn errors(codes: &[u16]) -> Vec<(String, Value)> {
    codes.iter().map(|c| (c.to_string(), json!({"$ref": "#/components/responses/Error"}))).collect()
}

fn operation(id: &str, summary: &str, parameters: Value, body: Option<Value>, success: Value, error_codes: &[u16]) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert("200".into(), success);
    for (code, response) in errors(error_codes) {
        responses.insert(code, response);
    }
    let mut op = json!({"operationId": id, "summary": summary, "parameters": parameters, "responses": responses});
    if let Some(body) = body {
        op["requestBody"] = body;
    }
    op
}

/// Statuses any authenticated route may answer with: bad request, key, rate limit, limits, the
/// database being away.
const COMMON: &[u16] = &[400, 401, 404, 429, 503];

/// The admin routes: 403 when the controller has no admin token.
const ADMIN: &[u16] = &[400, 401, 403, 429, 503];

fn param(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn paths() -> Value {
    let json_body = |schema: &str| json!({"required": true, "content": json_of(schema)});
    json!({
        "/v1/files": {
            "get": operation("listFiles", "List the project's files, newest first unless order=asc", json!([param("After"),
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                {"name": "order", "in": "query", "required": false, "schema": {"type": "string", "enum": ["asc", "desc"]}},
                {"name": "purpose", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 64}}]), None,
                ok("#/components/schemas/FileList"), COMMON),
            "post": operation("uploadFile", "Upload a JSONL training file (multipart: file, purpose=fine-tune)", json!([]),
                Some(json!({"required": true, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream"},
                                   "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}})),
                ok("#/components/schemas/File"), &[400, 401, 413, 429, 503]),
        },
        "/v1/files/{id}": {
            "get": operation("retrieveFile", "A file", json!([param("FileId")]), None, ok("#/components/schemas/File"), COMMON),
            "delete": operation("deleteFile", "Delete a file", json!([param("FileId")]), None, ok("#/components/schemas/Deleted"), COMMON),
        },
        "/v1/files/{id}/content": {
            "get": operation("downloadFile", "A file's bytes", json!([param("FileId")]), None,
                json!({"description": "The bytes", "content": {"application/octet-stream": {"schema": {"type": "string"}}}}), COMMON),
        },
        "/v1/fine_tuning/jobs": {
            "get": operation("listJobs", "List the project's jobs, newest first (metadata[KEY]=VALUE keeps the jobs with those pairs)",
                json!([param("After"), param("Limit"),
                    {"name": "metadata", "in": "query", "required": false, "style": "deepObject", "explode": true,
                     "schema": {"type": "object", "maxProperties": 16, "additionalProperties": {"type": "string", "maxLength": 512}}}]),
                None, ok("#/components/schemas/JobList"), COMMON),
            "post": operation("createJob", "Create a fine-tuning job (Idempotency-Key honoured)",
                json!([{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 255}}]),
                Some(json_body("#/components/schemas/CreateJob")), ok("#/components/schemas/Job"), &[400, 401, 404, 409, 415, 429, 503]),
        },
        "/v1/fine_tuning/jobs/{id}": {
            "get": operation("retrieveJob", "A job", json!([param("JobId")]), None, ok("#/components/schemas/Job"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/cancel": {
            "post": operation("cancelJob", "Cancel a job", json!([param("JobId")]), None, ok("#/components/schemas/Job"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/pause": {
            "post": operation("pauseJob", "Pause a job (it checkpoints and stops)", json!([param("JobId")]), None, ok("#/components/schemas/Job"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/resume": {
            "post": operation("resumeJob", "Resume a paused job", json!([param("JobId")]), None, ok("#/components/schemas/Job"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/events": {
            "get": operation("listJobEvents", "A job's events, newest first", json!([param("JobId"), param("After"), param("Limit")]), None,
                ok("#/components/schemas/EventList"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/checkpoints": {
            "get": operation("listJobCheckpoints", "A job's committed checkpoints", json!([param("JobId"), param("After"), param("Limit")]), None,
                ok("#/components/schemas/CheckpointList"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/metrics": {
            "get": operation("listJobMetrics", "A job's loss curve, one point per step, oldest first (a page with after=STEP and limit)",
                json!([param("JobId"),
                    {"name": "after", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 20},
                     "description": "The last step of the previous page"},
                    {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100000}}]), None,
                ok("#/components/schemas/MetricList"), COMMON),
        },
        "/v1/fine_tuning/jobs/{id}/evaluations": {
            "get": operation("listJobEvaluations", "Evaluations of a job's fine-tuned model", json!([param("JobId"), param("After"), param("Limit")]), None,
                ok("#/components/schemas/EvaluationList"), COMMON),
        },
        "/v1/evaluations": {
            "get": operation("listEvaluations", "The project's evaluations, newest first", json!([param("After"), param("Limit"),
                {"name": "model", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 256}},
                {"name": "fine_tuning_job", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 64}}]), None,
                ok("#/components/schemas/EvaluationList"), COMMON),
            "post": operation("createEvaluation", "Evaluate a model on a benchmark", json!([]),
                Some(json_body("#/components/schemas/CreateEvaluation")), ok("#/components/schemas/Evaluation"), &[400, 401, 404, 415, 429, 503]),
        },
        "/v1/evaluations/{id}": {
            "get": operation("retrieveEvaluation", "An evaluation", json!([param("EvaluationId")]), None, ok("#/components/schemas/Evaluation"), COMMON),
        },
        "/v1/evaluations/{id}/items": {
            "get": operation("listEvaluationItems", "An evaluation's scored items", json!([param("EvaluationId"),
                {"name": "after", "in": "query", "required": false, "schema": {"type": "integer", "minimum": -1}}, param("Limit")]), None,
                ok("#/components/schemas/EvaluationItemList"), COMMON),
        },
        "/v1/evaluations/{id}/cancel": {
            "post": operation("cancelEvaluation", "Cancel an evaluation", json!([param("EvaluationId")]), None, ok("#/components/schemas/Evaluation"), COMMON),
        },
        "/v1/chat/completions": {
            "post": completion_operation("createChatCompletion",
                "A chat completion from a base model or one of the project's fine-tuned models, served by an inference worker \
                 (stream: server-sent events of chat.completion.chunk objects); 503 with Retry-After when none can take it",
                "#/components/schemas/CreateChatCompletionRequest", "#/components/schemas/ChatCompletion"),
        },
        "/v1/completions": {
            "post": completion_operation("createCompletion", "A text completion of a prompt (legacy completions)",
                "#/components/schemas/CreateCompletionRequest", "#/components/schemas/TextCompletion"),
        },
        "/v1/models": {
            "get": operation("listModels", "Base models and the project's fine-tuned models", json!([]), None, ok("#/components/schemas/ModelList"), COMMON),
        },
        "/v1/models/{model}": {
            "get": operation("retrieveModel", "A model", json!([{"name": "model", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 256}}]),
                None, ok("#/components/schemas/Model"), COMMON),
            "delete": operation("deleteModel", "Deletes a fine-tuned model of the project (a base model: 403)",
                json!([{"name": "model", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 256}}]),
                None, ok("#/components/schemas/DeletedModel"), &[400, 401, 403, 404, 429, 503]),
        },
        "/v1/admin/demand": {
            "get": operation("poolDemand", "Jobs and evaluations queued and running per pool, and live workers (admin token)",
                json!([{"name": "pool", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 64}}]), None,
                ok("#/components/schemas/PoolDemandList"), ADMIN),
        },
        "/v1/admin/workers": {
            "get": operation("listWorkers", "Workers in registration order, their state and placement, a page at a time (admin token)",
                json!([
                    {"name": "state", "in": "query", "required": false, "description": "Comma-separated: live, draining, stale, left, revoked",
                     "schema": {"type": "string", "maxLength": 64}},
                    {"name": "after", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 64}},
                    {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ]), None, ok("#/components/schemas/WorkerList"), ADMIN),
        },
        "/v1/admin/projects/{project}/shares": {
            "get": operation("projectShares", "A project's fair-share weight and GPU quota, for every pool and per pool (admin token)",
                json!([{"name": "project", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 256}}]), None,
                ok("#/components/schemas/ProjectShares"), ADMIN),
            "post": operation("setProjectShare", "Sets a project's fair-share weight and GPU quota, in one pool or every pool (admin token)",
                json!([{"name": "project", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 256}}]),
                Some(json!({"required": true, "content": json_of("#/components/schemas/SetProjectShare")})),
                ok("#/components/schemas/ProjectShares"), ADMIN),
        },
        "/healthz": {"get": {"operationId": "healthz", "security": [], "responses": {"200": {"description": "Alive"}}}},
    })
}

/// A completion route: a JSON answer, or server-sent events with `stream: true`.
fn completion_operation(id: &str, summary: &str, request: &str, answer: &str) -> Value {
    let success = json!({"description": "The completion, or its chunks as server-sent events", "content": {
        "application/json": {"schema": {"$ref": answer}},
        "text/event-stream": {"schema": {"type": "string"}},
    }});
    operation(
        id,
        summary,
        json!([]),
        Some(json!({"required": true, "content": json_of(request)})),
        success,
        &[400, 401, 404, 415, 429, 500, 503],
    )
}

fn completion_schemas() -> Value {
    let sampling = json!({
        "model": {"type": "string"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 16},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]},
        "seed": {"type": ["integer", "null"]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": false}]},
        "user": {"type": "string"},
    });
    let usage = json!({"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    let finish = json!({"enum": ["stop", "length"]});
    let mut chat_request = sampling.clone();
    chat_request["messages"] = json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}});
    chat_request["max_completion_tokens"] = json!({"type": ["integer", "null"], "minimum": 1});
    chat_request["logprobs"] = json!({"type": ["boolean", "null"]});
    chat_request["top_logprobs"] = json!({"type": ["integer", "null"], "minimum": 0, "maximum": 20});
    chat_request["tools"] = json!({"type": ["array", "null"], "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "description": {"type": "string"}}}}}});
    chat_request["tool_choice"] = json!({"oneOf": [{"enum": ["auto", "none"]}, {"type": "null"}]});
    let mut text_request = sampling;
    text_request["prompt"] = json!({"type": "string", "minLength": 1});
    text_request["logprobs"] = json!({"type": ["integer", "null"], "minimum": 0, "maximum": 5});
    json!({
        "CreateChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_request},
        "CreateCompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": text_request},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "system_fingerprint": {"type": "string"}, "usage": usage,
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
                "index": {"type": "integer"}, "finish_reason": finish, "logprobs": {"type": ["object", "null"]},
                "message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"const": "assistant"}, "content": {"type": "string"}}}}}},
        }},
        "TextCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "system_fingerprint": {"type": "string"}, "usage": usage,
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "finish_reason"], "properties": {
                "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish, "logprobs": {"type": ["object", "null"]}}}},
        }},
    })
}

fn list_of(item: &str) -> Value {
    json!({
        "type": "object", "required": ["object", "data", "has_more"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}},
            "has_more": {"type": "boolean"},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
        },
    })
}

fn nullable(kind: &str) -> Value {
    json!({"type": [kind, "null"]})
}

fn merged(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The objects of the admin routes (`api::admin`).
fn admin_schemas() -> Value {
    json!({
        "PoolDemand": {"type": "object", "required": ["object", "pool", "demand", "queued_jobs", "running_jobs", "workers"], "properties": {
            "object": {"const": "pool_demand"}, "pool": {"type": "string"}, "demand": {"type": "integer"},
            "queued_jobs": {"type": "integer"}, "running_jobs": {"type": "integer"}, "queued_evaluations": {"type": "integer"},
            "running_evaluations": {"type": "integer"}, "gpu_memory_gb_asked": {"type": "integer"},
            "gpus_asked": {"type": "integer"}, "nodes_asked": {"type": "integer"}, "oldest_queued_seconds": {"type": "integer"},
            "workers": {"type": "integer"},
            "draining_workers": {"type": "integer"},
            "shapes": {"type": "array", "description": "Queued and running work by shape (GPUs per node, nodes)",
                "items": {"type": "object", "required": ["gpus", "nodes", "queued", "running"], "properties": {
                    "gpus": {"type": "integer"}, "nodes": {"type": "integer"}, "queued": {"type": "integer"}, "running": {"type": "integer"}}}}}},
        "PoolDemandList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/PoolDemand"}}}},
        "Worker": {"type": "object", "required": ["object", "id", "name", "state", "pools"], "properties": {
            "object": {"const": "worker"}, "id": {"type": "string"}, "name": {"type": "string"},
            "state": {"type": "string", "enum": ["live", "stale", "draining", "left", "revoked"]},
            "pools": {"type": "array", "items": {"type": "string"}}, "device_kind": {"type": "string"},
            "gpu_name": nullable("string"), "gpu_memory_bytes": nullable("integer"), "gpus": {"type": "integer"},
            "nodes": {"type": "integer"}, "serving": {"type": "boolean"}, "version": {"type": "string"},
            "fleet_id": nullable("string"), "slurm_job_id": nullable("string"), "pod_name": nullable("string"),
            "registered_at": {"type": "integer"}, "last_heartbeat_at": {"type": "integer"}}},
        "DeletedModel": {"type": "object", "required": ["id", "object", "deleted"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "deleted": {"type": "boolean"}}},
        "SetProjectShare": {"type": "object", "additionalProperties": false, "properties": {
            "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
            "max_gpus": {"type": ["integer", "null"], "minimum": 0, "maximum": 1024},
            "pool": {"type": "string", "maxLength": 64}}},
        "ProjectShares": {"type": "object", "required": ["object", "project", "data"], "properties": {
            "object": {"const": "list"}, "project": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object", "required": ["pool"], "properties": {
                "pool": {"type": "string"}, "weight": nullable("number"), "max_gpus": nullable("integer")}}}}},
        "WorkerList": {"type": "object", "required": ["object", "data", "has_more"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Worker"}},
            "has_more": {"type": "boolean"}, "first_id": nullable("string"), "last_id": nullable("string")}},
    })
}

fn schemas() -> Value {
    let error_object = json!({"type": ["object", "null"], "properties": {
        "code": nullable("string"), "message": {"type": "string"}, "param": nullable("string")}});
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": nullable("string"),
                "code": nullable("string"), "request_id": nullable("string"),
            }}},
        },
        "File": {
            "type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
            "properties": {
                "id": {"type": "string", "pattern": "^file-"}, "object": {"const": "file"}, "bytes": {"type": "integer"},
                "created_at": {"type": "integer"}, "filename": {"type": "string"}, "purpose": {"type": "string"},
                "status": {"type": "string"}, "status_details": nullable("string"), "expires_at": nullable("integer"),
            },
        },
        "FileList": list_of("File"),
        "Deleted": {"type": "object", "required": ["id", "object", "deleted"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"type": "boolean"}}},
        "CreateJob": {
            "type": "object", "required": ["model", "training_file"], "additionalProperties": false,
            "properties": {
                "model": {"type": "string"}, "training_file": {"type": "string"}, "validation_file": nullable("string"),
                "suffix": nullable("string"), "seed": nullable("integer"),
                "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
                "method": {"type": "object", "additionalProperties": false, "properties": {
                    "type": {"type": "string", "enum": ["supervised", "dpo", "continued_pretraining", "full", "reinforcement"]},
                    "supervised": {"type": "object", "properties": {"hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"}}},
                    "dpo": {"type": "object", "properties": {"hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"}}},
                    "continued_pretraining": {"type": "object", "properties": {"hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"}}},
                    "full": {"type": "object", "properties": {"hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"}}},
                    "reinforcement": {"type": "object"}}},
                "integrations": {"type": ["array", "null"], "maxItems": 1, "items": {
                    "type": "object", "required": ["type", "mlflow"], "properties": {
                        "type": {"const": "mlflow"},
                        "mlflow": {"type": "object", "required": ["experiment"], "additionalProperties": false, "properties": {
                            "experiment": {"type": "string", "minLength": 1, "maxLength": 256},
                            "run_name": {"type": "string", "minLength": 1, "maxLength": 256},
                            "tags": {"type": "object", "additionalProperties": {"type": "string"}}}}}},
                    "description": "Log the run to the MLflow server the operator configured (--mlflow-tracking-uri); W&B is refused"},
                "checkpoint_every": {"type": "integer", "minimum": 1, "description": "Steps between checkpoints besides each epoch's end"},
                "keep_checkpoints": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Newest checkpoints kept, listed and served as models (3)"},
                "eval_every": {"type": "integer", "minimum": 1, "description": "Steps between validation passes (default: each epoch's end)"},
                "lora": {"type": "object", "additionalProperties": false, "properties": {
                    "rank": {"type": "integer"}, "alpha": {"type": "number"}, "dropout": {"type": "number"},
                    "target_modules": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "use_rslora": {"type": "boolean"}}},
                "learning_rate": {"type": "number"}, "lr_scheduler": {"type": "string", "enum": ["cosine", "linear", "constant"]},
                "warmup_ratio": {"type": "number"}, "max_seq_length": {"type": "integer"}, "packing": {"type": "boolean"},
                "train_on_inputs": {"type": "boolean"}, "gradient_checkpointing": {"type": "boolean"},
                "gpu_memory_gb": {"type": "integer"}, "pool": {"type": "string"}, "priority": {"type": "integer"},
                "gpus": {"type": "integer", "minimum": 1, "maximum": 64,
                         "description": "Data-parallel ranks (GPUs); hyperparameters.batch_size is the global batch, split evenly over them"},
                "nodes": {"type": "integer", "minimum": 1, "maximum": 64,
                          "description": "Nodes the gpus span (a worker in a multi-node Slurm allocation runs them)"},
                "decontaminate": {"type": "object"}, "evaluations": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Hyperparameters": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "n_epochs": {"oneOf": [{"const": "auto"}, {"type": "integer"}]},
                "batch_size": {"oneOf": [{"const": "auto"}, {"type": "integer"}]},
                "learning_rate_multiplier": {"oneOf": [{"const": "auto"}, {"type": "number"}]},
                "beta": {"oneOf": [{"const": "auto"}, {"type": "number"}], "description": "DPO only: in (0, 2]; auto is 0.1"},
            },
        },
        "Job": {
            "type": "object",
            "required": ["id", "object", "created_at", "error", "fine_tuned_model", "finished_at", "hyperparameters", "model",
                         "organization_id", "result_files", "status", "trained_tokens", "training_file", "validation_file", "seed"],
            "properties": {
                "id": {"type": "string", "pattern": "^ftjob-"}, "object": {"const": "fine_tuning.job"},
                "created_at": {"type": "integer"}, "error": error_object, "fine_tuned_model": nullable("string"),
                "finished_at": nullable("integer"), "hyperparameters": {"type": "object"}, "model": {"type": "string"},
                "organization_id": {"type": "string"}, "result_files": {"type": "array", "items": {"type": "string"}},
                "status": {"type": "string", "enum": ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]},
                "trained_tokens": nullable("integer"), "training_file": {"type": "string"}, "validation_file": nullable("string"),
                "seed": {"type": "integer"}, "method": {"type": "object"}, "metadata": {"type": ["object", "null"]},
                "estimated_finish": nullable("integer"), "integrations": {"type": "array"}, "user_provided_suffix": nullable("string"),
                "lathe": {"type": "object"},
            },
        },
        "JobList": list_of("Job"),
        "Event": {
            "type": "object", "required": ["id", "object", "created_at", "level", "message", "type"],
            "properties": {
                "id": {"type": "string", "pattern": "^ftevt-"}, "object": {"const": "fine_tuning.job.event"},
                "created_at": {"type": "integer"}, "level": {"type": "string", "enum": ["info", "warn", "error"]},
                "message": {"type": "string"}, "data": {}, "type": {"type": "string", "enum": ["message", "metrics"]},
            },
        },
        "EventList": list_of("Event"),
        "Checkpoint": {
            "type": "object", "required": ["id", "object", "created_at", "fine_tuned_model_checkpoint", "fine_tuning_job_id", "metrics", "step_number"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "fine_tuning.job.checkpoint"}, "created_at": {"type": "integer"},
                "fine_tuned_model_checkpoint": {"type": "string"}, "fine_tuning_job_id": {"type": "string"},
                "metrics": {"type": "object"}, "step_number": {"type": "integer"},
            },
        },
        "CheckpointList": list_of("Checkpoint"),
        "MetricPoint": {"type": "object", "required": ["step"], "properties": {"step": {"type": "integer"}}},
        "MetricList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/MetricPoint"}},
            "has_more": {"type": "boolean"}, "first_id": nullable("string"), "last_id": nullable("string")}},
        "CreateEvaluation": {
            "type": "object", "required": ["model", "benchmark"], "additionalProperties": false,
            "properties": {
                "model": {"type": "string"}, "benchmark": {"type": "string"}, "file": {"type": "string"},
                "limit": {"type": "integer"}, "shots": {"type": "integer"}, "seed": {"type": "integer"},
                "system_prompt": {"type": "string"}, "mode": {"type": "string", "enum": ["generate", "likelihood"]},
                "max_new_tokens": {"type": "integer"}, "extraction": {"type": "string"},
                "unparsable_counts_as_wrong": {"type": "boolean"},
            },
        },
        "Evaluation": {
            "type": "object", "required": ["id", "object", "created_at", "model", "benchmark", "status", "progress"],
            "properties": {
                "id": {"type": "string", "pattern": "^eval-"}, "object": {"const": "evaluation"},
                "created_at": {"type": "integer"}, "started_at": nullable("integer"), "finished_at": nullable("integer"),
                "model": {"type": "string"}, "fine_tuning_job": nullable("string"), "benchmark": {"type": "string"},
                "status": {"type": "string"}, "protocol": {"type": "object"}, "progress": {"type": "object"},
                "result": {"type": ["object", "null"]}, "error": error_object, "attempt": {"type": "integer"},
                "retries": {"type": "integer"},
            },
        },
        "EvaluationList": list_of("Evaluation"),
        "EvaluationItem": {"type": "object", "required": ["object", "index"], "properties": {
            "object": {"const": "evaluation.item"}, "index": {"type": "integer"}, "expected": {}, "extracted": {},
            "correct": nullable("boolean"), "output": nullable("string")}},
        "EvaluationItemList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/EvaluationItem"}},
            "has_more": {"type": "boolean"}}},
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_repo_copy_is_the_document_the_code_serves() {
        let served = super::document();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let stored: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json")).expect("docs/openapi.json is JSON");
        assert!(stored == served, "docs/openapi.json is stale: regenerate it with `lathe-controller --print-openapi > docs/openapi.json`");
    }
}
