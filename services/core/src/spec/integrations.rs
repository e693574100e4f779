//! A job's `integrations`: where its run is also logged. OpenAI's shape
//! (`[{"type": "wandb", "wandb": {…}}]`); Lathe logs to MLflow (`{"type": "mlflow", "mlflow":
//! {"experiment", "run_name", "tags"}}`), at the tracking server the operator configures on the
//! controller — never one named in a request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{storable_text, SpecError};

/// One integration, as the job object shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Integration {
    #[serde(rename = "type")]
    pub kind: String,
    pub mlflow: MlflowRun,
}

/// Where in MLflow the job's run goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlflowRun {
    pub experiment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The request's `integrations`: none, or one MLflow run.
pub fn resolve_integrations(value: Option<&Value>) -> Result<Vec<Integration>, SpecError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(SpecError::invalid("integrations", "must be an array of {\"type\": …} objects")),
    };
    let mut resolved = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let param = format!("integrations[{i}]");
        match item.get("type").and_then(Value::as_str) {
            Some("mlflow") => resolved.push(Integration { kind: "mlflow".into(), mlflow: mlflow_run(&param, item.get("mlflow"))? }),
            Some("wandb") => {
                return Err(SpecError::unsupported(
                    &format!("{param}.type"),
                    "W&B is not configured on this server; Lathe logs runs to MLflow: \
                     {\"type\": \"mlflow\", \"mlflow\": {\"experiment\": \"…\"}} (the operator sets lathe-controller --mlflow-tracking-uri)",
                ))
            }
            Some(other) => return Err(SpecError::invalid(&format!("{param}.type"), format!("unknown integration {other:?}; supported: mlflow"))),
            None => return Err(SpecError::invalid(&format!("{param}.type"), "missing required parameter")),
        }
    }
    if resolved.len() > 1 {
        return Err(SpecError::invalid("integrations", "at most one mlflow integration per job"));
    }
    Ok(resolved)
}

fn mlflow_run(param: &str, value: Option<&Value>) -> Result<MlflowRun, SpecError> {
    let param = format!("{param}.mlflow");
    let Some(Value::Object(fields)) = value else {
        return Err(SpecError::invalid(&param, "required: {\"experiment\": \"…\", \"run_name\"?: \"…\", \"tags\"?: {…}}"));
    };
    if let Some(unknown) = fields.keys().find(|k| !matches!(k.as_str(), "experiment" | "run_name" | "tags")) {
        return Err(SpecError::from_serde(&format!("{param}.{unknown}"), format!("unknown field `{unknown}`")));
    }
    let text = |name: &str, max: usize| -> Result<Option<String>, SpecError> {
        let field = format!("{param}.{name}");
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= max => {
                storable_text(&field, s)?;
                Ok(Some(s.clone()))
            }
            Some(_) => Err(SpecError::invalid(&field, format!("must be a non-empty string of at most {max} characters"))),
        }
    };
    let experiment =
        text("experiment", 256)?.ok_or_else(|| SpecError::invalid(&format!("{param}.experiment"), "missing required parameter"))?;
    let run_name = text("run_name", 256)?;
    let mut tags = BTreeMap::new();
    match fields.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) if map.len() <= 32 => {
            for (key, value) in map {
                let (Some(value), false) = (value.as_str(), key.is_empty() || key.len() > 250) else {
                    return Err(SpecError::invalid(
                        &format!("{param}.tags"),
                        format!("tag {key:?}: keys are 1 to 250 characters and values strings"),
                    ));
                };
                tags.insert(key.clone(), value.to_string());
            }
        }
        Some(_) => return Err(SpecError::invalid(&format!("{param}.tags"), "must be an object of at most 32 string tags")),
    }
    Ok(MlflowRun { experiment, run_name, tags })
}
