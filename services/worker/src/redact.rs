//! What a tenant reads never shows where this worker keeps things: a failure message sent to
//! the controller (and from there to the job's `error`) has the claim's paths replaced by what
//! the tenant knows them as: the file id, the model name, the job's output.

use std::path::Path;

use lathe_proto::v1::ClaimJobResponse;

use crate::WorkerConfig;

/// The substitutions for one claim, longest path first so a file under a root is named as the
/// file, not as the root.
pub struct Redactor {
    pairs: Vec<(String, String)>,
}

impl Redactor {
    pub fn for_claim(claim: &ClaimJobResponse, config: &WorkerConfig) -> Redactor {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for file in claim.training_file.iter().chain(claim.validation_file.iter()) {
            pairs.push((file.path.clone(), file.file_id.clone()));
        }
        pairs.push((claim.output_dir.clone(), "<job output>".into()));
        pairs.push((path_text(&config.models_root), "<models>".into()));
        if let Some(dir) = &config.eval_data_dir {
            pairs.push((path_text(dir), "<evaluation data>".into()));
        }
        pairs.retain(|(path, _)| path.len() > 1);
        pairs.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Redactor { pairs }
    }

    pub fn apply(&self, message: &str) -> String {
        let mut message = message.to_string();
        for (path, name) in &self.pairs {
            if message.contains(path.as_str()) {
                message = message.replace(path.as_str(), name);
            }
        }
        message
    }
}

fn path_text(path: &Path) -> String {
    path.display().to_string().trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_proto::v1::FileRef;

    #[test]
    fn claim_paths_become_the_names_a_tenant_knows() {
        let claim = ClaimJobResponse {
            training_file: Some(FileRef { file_id: "file-abc".into(), path: "/srv/lathe/files/file-abc".into(), sha256: String::new() }),
            output_dir: "/srv/lathe/jobs/ftjob-1".into(),
            ..Default::default()
        };
        let config = WorkerConfig {
            controller_url: String::new(),
            token: String::new(),
            name: String::new(),
            pools: vec![],
            device: "cpu".into(),
            gpu_name: String::new(),
            gpu_memory_bytes: 0,
            gpus: 1,
            nodes: 1,
            dtype: "auto".into(),
            models_root: "/srv/models/".into(),
            checkpoint_every: 1,
            threads: 0,
            redis_url: String::new(),
            redis_prefix: String::new(),
            metrics_listen: None,
            eval_data_dir: None,
            tls: Default::default(),
            lifecycle: Default::default(),
            placement: Default::default(),
            shared_telemetry: None,
            serve: None,
        };
        let redactor = Redactor::for_claim(&claim, &config);
        assert_eq!(
            redactor.apply("/srv/lathe/files/file-abc:3: chat template: the template rejected the conversation"),
            "file-abc:3: chat template: the template rejected the conversation"
        );
        assert_eq!(redactor.apply("/srv/lathe/jobs/ftjob-1/train.jsonl: gone"), "<job output>/train.jsonl: gone");
        assert_eq!(redactor.apply("/srv/models/tiny/tokenizer.json: missing"), "<models>/tiny/tokenizer.json: missing");
    }
}
