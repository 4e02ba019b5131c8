-- When the provider last advertised its limit (ratelimit-* headers): an advertised
-- limit is trusted only while answers keep saying it, so a provider that stops
-- sending the headers, or a late answer, does not hold the account's ceiling.
ALTER TABLE provider_accounts ADD COLUMN advertised_at timestamptz;
