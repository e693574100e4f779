-- Inference servers (`lathe worker --serve`, docs/architecture.md §9): they answer chat and text
-- completions on their Serve stream and claim no jobs or evaluations, so demand does not count
-- them as training supply for their pools.
ALTER TABLE workers ADD COLUMN serving boolean NOT NULL DEFAULT false;
