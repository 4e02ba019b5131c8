-- Templates by reference, and one workflow per campaign id.

-- A campaign's subject and bodies, stored once per org under their digest. Our CLI and
-- Python client store them before a campaign starts, so the workflow input (and every
-- run after a continue-as-new) carries only the digest, whatever the template size.
-- The org is part of the key: one org can never name another org's templates.
CREATE TABLE campaign_templates (
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    digest      text NOT NULL CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    subject     text NOT NULL,
    html        text,
    text        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, digest)
);

-- The workflow that owns a campaign id. A second workflow with the same campaign id
-- would share the ledger and count its rows twice, so it is refused; runs of the same
-- workflow (continue-as-new, retry-failed, a campaign run again) keep the id.
ALTER TABLE campaigns ADD COLUMN workflow_id text;
