-- DPO steps report their rewards beside the loss (means over the step's pairs).
ALTER TABLE metrics
    ADD COLUMN rewards_chosen real,
    ADD COLUMN rewards_rejected real,
    ADD COLUMN rewards_accuracy real,
    ADD COLUMN rewards_margin real;
