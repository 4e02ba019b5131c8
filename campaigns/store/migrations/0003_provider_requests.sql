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

-- The last recipient id of the provider request that failed each recipient. Keyset
-- ranges of later passes are never cut between a request's first recipient and this
-- one, so a failed request is always resent whole, whatever rows lie between its
-- recipients. Requests recorded as failed before this migration get theirs here.
ALTER TABLE deliveries ADD COLUMN request_last_id bigint;
UPDATE deliveries d SET request_last_id = spans.last_id
FROM (
    SELECT campaign_id, request_key, max(recipient_id) AS last_id FROM deliveries
    WHERE status IN ('failed', 'abandoned') AND request_key IS NOT NULL
    GROUP BY campaign_id, request_key
) spans
WHERE d.campaign_id = spans.campaign_id AND d.request_key = spans.request_key
  AND d.status IN ('failed', 'abandoned');

-- Retry rounds, retry-failed and re-runs page soft failures with their request spans
-- from this index alone.
CREATE INDEX deliveries_to_retry ON deliveries (campaign_id, recipient_id)
    INCLUDE (request_last_id)
    WHERE status IN ('failed', 'abandoned');
