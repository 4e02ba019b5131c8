-- The last recipient id of the provider request that carried each recipient. Keyset
-- ranges of later passes are never cut between a request's first recipient and this
-- one, so a failed request is always resent whole, whatever rows lie between its
-- recipients.
ALTER TABLE deliveries ADD COLUMN request_last_id bigint;

DROP INDEX deliveries_to_retry;
CREATE INDEX deliveries_to_retry ON deliveries (campaign_id, recipient_id)
    INCLUDE (request_last_id)
    WHERE status IN ('failed', 'abandoned');
