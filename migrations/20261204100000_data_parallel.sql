-- Data parallel (docs/architecture.md §7). A job asks for `gpus` devices (its data-parallel
-- ranks) on `nodes` nodes; a worker offers the devices it runs jobs on. The claim gives a job
-- only to a worker with at least as many.
ALTER TABLE jobs ADD COLUMN gpus integer NOT NULL DEFAULT 1 CHECK (gpus BETWEEN 1 AND 64);
ALTER TABLE jobs ADD COLUMN nodes integer NOT NULL DEFAULT 1 CHECK (nodes BETWEEN 1 AND 64);
ALTER TABLE workers ADD COLUMN gpus integer NOT NULL DEFAULT 1 CHECK (gpus BETWEEN 1 AND 1024);
-- Nodes a worker can spread one job over: a worker inside a multi-node Slurm allocation
-- (`lathe worker --nodes K`) runs rank 0 itself and the other ranks through srun. Its `gpus`
-- are per node.
ALTER TABLE workers ADD COLUMN nodes integer NOT NULL DEFAULT 1 CHECK (nodes BETWEEN 1 AND 64);
