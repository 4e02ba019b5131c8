-- Provider accounts: the limit every campaign sending through one account shares.
--
-- An account's batch activities run on a task queue of their own whose Temporal rate
-- limit is the account's current rate in requests/s (see ARCHITECTURE.md, "The shared
-- send limit"). The configured limits are the operator's; the adaptive state below
-- them is written by the workers' rate controller, one row lock per process every
-- half second, with the database's clock as the only clock.
CREATE TABLE provider_accounts (
    id                    text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Configured limits; NULL: none (requests/s, and emails/s over all requests).
    requests_per_second   double precision
        CHECK (requests_per_second > 0 AND requests_per_second <= 100000),
    emails_per_second     double precision
        CHECK (emails_per_second > 0 AND emails_per_second <= 10000000),
    -- The adaptive rate in requests/s (never above the configured one), the rate at
    -- which the provider last throttled, and what its ratelimit-* headers advertise.
    current_rps           double precision,
    throttled_at_rps      double precision,
    advertised_rps        double precision,
    last_decrease_at      timestamptz,
    -- The rate last set on the task queue (NULL: none) and when.
    applied_rps           double precision,
    applied_at            timestamptz,
    -- Answers counted since the last decision, added by every worker process.
    window_started_at     timestamptz NOT NULL DEFAULT now(),
    window_answered       bigint NOT NULL DEFAULT 0,
    window_throttled      bigint NOT NULL DEFAULT 0,
    -- Decayed counts (about the last 30 s) for `campaigns capacity`.
    recent_answered       double precision NOT NULL DEFAULT 0,
    recent_throttled      double precision NOT NULL DEFAULT 0,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

INSERT INTO provider_accounts (id) VALUES ('default');

-- An org's plan: the most emails/s all its campaigns together may send (NULL: none).
ALTER TABLE orgs
    ADD COLUMN emails_per_second double precision
        CHECK (emails_per_second > 0 AND emails_per_second <= 10000000);

-- Campaigns that are sending, so that an org's cap is shared among them: each plan
-- of a page of recipients extends it; the end of a pass clears it.
ALTER TABLE campaigns ADD COLUMN sending_until timestamptz;
CREATE INDEX campaigns_sending ON campaigns (org_id, sending_until)
    WHERE sending_until IS NOT NULL;
