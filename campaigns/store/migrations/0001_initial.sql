-- Orgs, audiences, suppressions, campaigns and the delivery ledger.

CREATE TABLE orgs (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE org_feature_flags (
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    flag        text NOT NULL,
    enabled     boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, flag)
);

CREATE TABLE audiences (
    id            bigserial PRIMARY KEY,
    org_id        text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name          text NOT NULL,
    merge_fields  text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE recipients (
    id            bigserial PRIMARY KEY,
    audience_id   bigint NOT NULL REFERENCES audiences (id) ON DELETE CASCADE,
    email         text NOT NULL,
    name          text NOT NULL DEFAULT '',
    merge_fields  jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (audience_id, email)
);
-- Keyset paging of an audience reads only this index.
CREATE INDEX recipients_audience_keyset ON recipients (audience_id, id);

CREATE TABLE suppressions (
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email       text NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('unsubscribed', 'bounced', 'complained')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, email)
);

-- The spec a campaign was started with: batch activities read templates from here,
-- so they never travel through workflow history.
CREATE TABLE campaigns (
    id           text PRIMARY KEY,
    org_id       text NOT NULL REFERENCES orgs (id),
    audience_id  bigint NOT NULL REFERENCES audiences (id),
    spec         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TYPE delivery_status AS ENUM ('sent', 'failed', 'rejected', 'suppressed', 'abandoned');

-- One row per (campaign, recipient): the ledger that makes sends exactly-once.
CREATE TABLE deliveries (
    campaign_id          text NOT NULL,
    recipient_id         bigint NOT NULL,
    status               delivery_status NOT NULL,
    execution_id         text NOT NULL,      -- the campaign execution that wrote the outcome
    round                smallint NOT NULL,  -- 0 = first pass, n = n-th retry round
    attempts             integer NOT NULL DEFAULT 1,
    provider_message_id  text,
    request_key          text,               -- idempotency key of the provider request
    last_error           text,
    first_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_attempt_at      timestamptz NOT NULL DEFAULT now(),
    sent_at              timestamptz,
    PRIMARY KEY (campaign_id, recipient_id)
);
-- Retry rounds page soft failures and summaries count by status from this index alone.
CREATE INDEX deliveries_by_status ON deliveries (campaign_id, status, recipient_id);
