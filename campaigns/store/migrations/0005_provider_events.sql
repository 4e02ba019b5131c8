-- Hearing back from the provider: signed webhook events, delivery and engagement in the
-- ledger, soft-bounce streaks, unsubscribes, and per-campaign engagement counters.

-- Every webhook event the HTTP service accepted, stored before it answers 2xx. The
-- svix-id is unique, so an event the provider delivers twice is stored once. Events are
-- applied to the ledger in batches, after they are stored: answering never waits for
-- that work. An event naming a message the ledger does not know yet (its batch has not
-- recorded) is tried again with backoff, then kept as 'unmatched'.
CREATE TABLE webhook_events (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    svix_id      text NOT NULL UNIQUE,
    type         text NOT NULL,
    email_id     text,                  -- the provider's message id, when the type has one
    bounce_type  text CHECK (bounce_type IN ('hard', 'soft')),
    occurred_at  timestamptz NOT NULL,  -- the event's created_at
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    next_try_at  timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz,
    outcome      text CHECK (outcome IN ('applied', 'unmatched', 'ignored'))
);
-- The applier reads only pending events, from this index alone.
CREATE INDEX webhook_events_pending ON webhook_events (next_try_at) WHERE applied_at IS NULL;

-- What the provider said of each sent message. Timestamps are the events' own, so
-- events that arrive out of order end in the same state: the first open stays first,
-- and a bounce is never undone by a late delivery.
ALTER TABLE deliveries
    ADD COLUMN delivered_at     timestamptz,
    ADD COLUMN delayed_at       timestamptz,
    ADD COLUMN bounced_at       timestamptz,
    ADD COLUMN bounce_type      text CHECK (bounce_type IN ('hard', 'soft')),
    ADD COLUMN soft_bounces     integer NOT NULL DEFAULT 0,
    ADD COLUMN complained_at    timestamptz,
    ADD COLUMN opened_at        timestamptz,
    ADD COLUMN opens            integer NOT NULL DEFAULT 0,
    ADD COLUMN clicked_at       timestamptz,
    ADD COLUMN clicks           integer NOT NULL DEFAULT 0,
    ADD COLUMN provider_failed_at timestamptz,
    ADD COLUMN unsubscribed_at  timestamptz;
-- Events name messages by the provider's id.
CREATE INDEX deliveries_by_message ON deliveries (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- The campaign whose message caused a suppression (a bounce, a complaint or an
-- unsubscribe), when one did.
ALTER TABLE suppressions ADD COLUMN campaign_id text;

-- Soft bounces in a row, per address of an org; a delivery after the last one resets
-- the streak, and a long enough streak suppresses the address.
CREATE TABLE bounce_streaks (
    org_id          text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email           text NOT NULL,
    soft_in_a_row   integer NOT NULL,
    last_bounce_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, email)
);

-- Per-campaign counts of first transitions (a message delivered, bounced, opened ...),
-- kept in the same transaction as the ledger rows they count, so the report and the
-- reputation watch read one row instead of the campaign's whole ledger.
CREATE TABLE campaign_engagement (
    campaign_id   text PRIMARY KEY,
    org_id        text NOT NULL,
    delivered     bigint NOT NULL DEFAULT 0,
    delayed       bigint NOT NULL DEFAULT 0,
    hard_bounced  bigint NOT NULL DEFAULT 0,
    soft_bounced  bigint NOT NULL DEFAULT 0,
    complained    bigint NOT NULL DEFAULT 0,
    opened        bigint NOT NULL DEFAULT 0,
    clicked       bigint NOT NULL DEFAULT 0,
    provider_failed bigint NOT NULL DEFAULT 0,
    unsubscribed  bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
