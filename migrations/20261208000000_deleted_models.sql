-- DELETE /v1/models/{ft:…}: the fine-tuned model is gone from /v1/models, chat, completions and
-- evaluations; the job keeps its history and names the model it made, as OpenAI's do.
ALTER TABLE jobs ADD COLUMN model_deleted_at timestamptz;
