-- Org fairness: each org's share of the task queue within a priority level.
--
-- Campaign activities are scheduled with the org id as Temporal's fairness key and
-- this weight as its fairness weight, so orgs with backlogged work are served in
-- proportion to their weights. The range is Temporal's own (the server clamps
-- anything outside it), so a weight the server would silently change is refused here.
ALTER TABLE orgs
    ADD COLUMN fairness_weight real NOT NULL DEFAULT 1
        CHECK (fairness_weight >= 0.001 AND fairness_weight <= 1000);
