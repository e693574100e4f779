-- Preference pairs (DPO data in OpenAI's format) are a fourth training file format.
ALTER TABLE files DROP CONSTRAINT IF EXISTS files_format_check;
ALTER TABLE files ADD CONSTRAINT files_format_check
    CHECK (format IN ('chat', 'prompt_completion', 'text', 'preference'));
