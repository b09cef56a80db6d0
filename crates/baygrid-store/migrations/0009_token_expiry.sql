-- Tokens may expire: an operator issues a token for a time (a regulator's audit, an
-- agent's rotation period), after which it is refused as a revoked one is.
ALTER TABLE tokens ADD COLUMN expires_ms BIGINT;
