//! The relay's mailboxes (a query's two sides, a fusion run's workers), kept durably: a
//! message is accepted only once it is committed, so a server that restarts mid-run still
//! delivers it. A sender numbers its messages to each mailbox from 0; a number already
//! accepted is a resend after a lost answer and is not stored twice. Messages an addressee
//! has acknowledged (by asking for later ones) are deleted with the next message posted to
//! its mailbox, so that a message costs one commit; a conversation's mailboxes are deleted
//! with the change that ends its query or run.

use sqlx::{AnyConnection, Row};

use crate::{Result, Store, StoreError};

/// The conversation of a query's two sides.
pub fn query_conversation(id: &str) -> String {
    format!("query/{id}")
}

/// The conversation of a fusion run's workers.
pub fn fusion_conversation(id: &str) -> String {
    format!("fusion/{id}")
}

/// One addressee's mailbox in a conversation.
pub fn mailbox(conversation: &str, addressee: &str) -> String {
    format!("{conversation}/{addressee}")
}

/// One message to a mailbox.
#[derive(Debug, Clone)]
pub struct RelayMessage {
    /// The query or run it belongs to, by which its mailboxes are dropped together.
    pub conversation: String,
    pub mailbox: String,
    pub sender: String,
    /// The sender's number for it, counting its messages to this mailbox from 0.
    pub n: i64,
    pub body: Vec<u8>,
}

/// What became of a message posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Stored, with its number in the mailbox.
    Accepted(i64),
    /// Its number had been accepted before: a resend, not stored again.
    Again,
}

impl Store {
    /// Stores `message` in its mailbox, unless the sender's number for it was accepted
    /// before, and deletes the mailbox's messages numbered below `acknowledged` (its
    /// addressee has them). A number beyond the next one expected is a conflict: a message
    /// between was never accepted.
    pub async fn relay_post(&self, message: RelayMessage, acknowledged: i64) -> Result<Posted> {
        if message.n < 0 {
            return Err(StoreError::Conflict(format!(
                "message number {} is negative",
                message.n
            )));
        }
        self.write(move |conn| {
            Box::pin(async move {
                let accepted: i64 = sqlx::query(
                    "SELECT accepted FROM relay_senders WHERE mailbox = $1 AND sender = $2",
                )
                .bind(&message.mailbox)
                .bind(&message.sender)
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| row.try_get::<i64, _>(0))
                .transpose()?
                .unwrap_or(0);
                if message.n < accepted {
                    return Ok(Posted::Again);
                }
                if message.n > accepted {
                    return Err(StoreError::Conflict(format!(
                        "message {} from `{}` to `{}` skips message {accepted}, which was never accepted",
                        message.n, message.sender, message.mailbox
                    )));
                }
                let seq: i64 = sqlx::query(
                    "SELECT CAST(COALESCE(SUM(accepted), 0) AS BIGINT) FROM relay_senders WHERE mailbox = $1",
                )
                .bind(&message.mailbox)
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
                sqlx::query(
                    "INSERT INTO relay_senders (mailbox, sender, conversation, accepted) \
                     VALUES ($1, $2, $3, 1) \
                     ON CONFLICT (mailbox, sender) DO UPDATE SET accepted = relay_senders.accepted + 1",
                )
                .bind(&message.mailbox)
                .bind(&message.sender)
                .bind(&message.conversation)
                .execute(&mut *conn)
                .await?;
                sqlx::query("DELETE FROM relay_messages WHERE mailbox = $1 AND seq < $2")
                    .bind(&message.mailbox)
                    .bind(acknowledged)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(
                    "INSERT INTO relay_messages (mailbox, seq, conversation, body) VALUES ($1, $2, $3, $4)",
                )
                .bind(&message.mailbox)
                .bind(seq)
                .bind(&message.conversation)
                .bind(message.body)
                .execute(&mut *conn)
                .await?;
                Ok(Posted::Accepted(seq))
            })
        })
        .await
    }

    /// The messages in `mailbox` numbered `from` on, in order.
    pub async fn relay_messages(&self, mailbox: &str, from: i64) -> Result<Vec<Vec<u8>>> {
        let rows = sqlx::query(
            "SELECT body FROM relay_messages WHERE mailbox = $1 AND seq >= $2 ORDER BY seq",
        )
        .bind(mailbox)
        .bind(from)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<Vec<u8>, _>(0)?))
            .collect()
    }

    /// Drops the mailboxes of every conversation whose query or run is not running (a
    /// store written before they were dropped with their ending), returning how many
    /// messages went.
    pub async fn relay_prune(&self) -> Result<u64> {
        self.write(move |conn| {
            Box::pin(async move {
                let mut gone = 0;
                for table in ["relay_messages", "relay_senders"] {
                    gone += sqlx::query(&format!(
                        "DELETE FROM {table} WHERE conversation NOT IN \
                         (SELECT 'query/' || id FROM queries WHERE state = 'running' \
                          UNION ALL SELECT 'fusion/' || id FROM fusion_runs WHERE state = 'running')"
                    ))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                }
                Ok(gone)
            })
        })
        .await
    }
}

/// Drops every mailbox of a conversation, in the caller's transaction (its query or run
/// ends).
pub(crate) async fn forget_in(conn: &mut AnyConnection, conversation: &str) -> Result<()> {
    for table in ["relay_messages", "relay_senders"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE conversation = $1"))
            .bind(conversation)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
