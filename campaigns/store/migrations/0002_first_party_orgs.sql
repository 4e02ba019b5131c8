-- First-party orgs: the org <-> token map the old system read, flag states, and the
-- snapshot of first-party orgs that an hourly schedule refreshes.

ALTER TABLE orgs ADD COLUMN verified_domain text;  -- the org's own verified sending domain

-- Flags keep the state the old store had; anything but 'on'/'off' is refused by the
-- refresh rather than guessed.
ALTER TABLE org_feature_flags ADD COLUMN state text;
UPDATE org_feature_flags SET state = CASE WHEN enabled THEN 'on' ELSE 'off' END;
ALTER TABLE org_feature_flags ALTER COLUMN state SET NOT NULL;
ALTER TABLE org_feature_flags DROP COLUMN enabled;
-- "Which orgs have flag F on" reads only this index.
CREATE INDEX org_feature_flags_by_flag ON org_feature_flags (flag, state, org_id);

CREATE TABLE org_tokens (
    token       text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX org_tokens_by_org ON org_tokens (org_id);

-- Each refresh writes one immutable snapshot row; first_party_current points at the one
-- in use. Swapping the pointer is a single-row update, so readers see the old set or
-- the new one, never a mix.
CREATE TABLE first_party_snapshots (
    version       bigint PRIMARY KEY,
    org_ids       text[] NOT NULL,  -- sorted
    size          integer NOT NULL,
    refreshed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE first_party_snapshot_version OWNED BY first_party_snapshots.version;

CREATE TABLE first_party_current (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version       bigint NOT NULL REFERENCES first_party_snapshots (version),
    refreshed_at  timestamptz NOT NULL
);
