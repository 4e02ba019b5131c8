-- The last recipient id of the provider request that failed each recipient. Keyset
-- ranges of later passes are never cut between a request's first recipient and this
-- one, so a failed request is always resent whole, whatever rows lie between its
-- recipients.
ALTER TABLE deliveries ADD COLUMN request_last_id bigint;
UPDATE deliveries d SET request_last_id = spans.last_id
FROM (
    SELECT campaign_id, request_key, max(recipient_id) AS last_id FROM deliveries
    WHERE status IN ('failed', 'abandoned') AND request_key IS NOT NULL
    GROUP BY campaign_id, request_key
) spans
WHERE d.campaign_id = spans.campaign_id AND d.request_key = spans.request_key
  AND d.status IN ('failed', 'abandoned');

DROP INDEX deliveries_to_retry;
CREATE INDEX deliveries_to_retry ON deliveries (campaign_id, recipient_id)
    INCLUDE (request_last_id)
    WHERE status IN ('failed', 'abandoned');
