-- Write-ahead of provider requests. A batch records each request it is about to send
-- (idempotency key and recipients) and clears them in the statement that records the
-- outcomes. A retry of a batch cut short in between re-sends exactly those requests
-- under the same keys, whatever changed meanwhile (a new suppression, the sender
-- identity, a merge field), so the provider replays instead of delivering twice.
CREATE TABLE provider_requests (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- planning order
    campaign_id    text NOT NULL,
    execution_id   text NOT NULL,
    round          smallint NOT NULL,
    batch_last_id  bigint NOT NULL,   -- the batch's keyset range ends here
    request_key    text NOT NULL,
    recipient_ids  bigint[] NOT NULL,
    planned_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_requests_by_batch
    ON provider_requests (campaign_id, execution_id, round, batch_last_id);

-- Retry rounds and retry-failed page soft failures with their request keys from this
-- index alone.
CREATE INDEX deliveries_to_retry ON deliveries (campaign_id, recipient_id) INCLUDE (request_key)
    WHERE status IN ('failed', 'abandoned');
