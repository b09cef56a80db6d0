-- The relay between workers at the vaults (a query's two sides, a fusion run's workers):
-- the messages accepted and not yet acknowledged by their addressee, so that a restarted
-- server still delivers them. A conversation is a query or a run; a mailbox, one of its
-- addressees.
CREATE TABLE relay_messages (
    mailbox TEXT NOT NULL,
    -- the message's number in its mailbox, from 0
    seq BIGINT NOT NULL,
    conversation TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (mailbox, seq)
);
CREATE INDEX relay_messages_conversation ON relay_messages (conversation);
-- How many messages each sender has had accepted into each mailbox: a sender numbers its
-- messages to a mailbox from 0, so a message resent after a lost answer is told from a new
-- one, and their sum numbers the mailbox's next message.
CREATE TABLE relay_senders (
    mailbox TEXT NOT NULL,
    sender TEXT NOT NULL,
    conversation TEXT NOT NULL,
    accepted BIGINT NOT NULL,
    PRIMARY KEY (mailbox, sender)
);
CREATE INDEX relay_senders_conversation ON relay_senders (conversation);
