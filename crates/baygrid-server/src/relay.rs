//! The relay between workers at the vaults (a query's two sides, a fusion run's workers):
//! a mailbox per addressee, kept in the store (`Store::relay_post`), so that a message
//! accepted before a restart is delivered after it. Asking for message `n` on
//! acknowledges every one before it; this server remembers that, and the next message
//! posted to the mailbox deletes them in its own commit, so a mailbox holds little more
//! than what is in flight. (A restart forgets the acknowledgements: the next ask makes
//! them again.) A conversation's mailboxes go with the change that ends its query or run.

use std::collections::HashMap;
use std::time::Duration;

use baygrid_store::{Posted, RelayMessage};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Whose messages: a query's two sides, or a fusion run's workers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Conversation<'a> {
    Query(&'a str),
    Fusion(&'a str),
}

impl Conversation<'_> {
    fn name(self) -> String {
        match self {
            Conversation::Query(id) => baygrid_store::query_conversation(id),
            Conversation::Fusion(id) => baygrid_store::fusion_conversation(id),
        }
    }
}

#[derive(Default)]
pub(crate) struct Relay {
    /// Fires when a message arrives or mailboxes are dropped.
    pub(crate) signal: tokio::sync::Notify,
    /// By mailbox: its messages below this number were acknowledged.
    acknowledged: std::sync::Mutex<HashMap<String, i64>>,
}

impl Relay {
    /// Stores a message from `sender` to `to` durably and wakes the receivers. `n` is the
    /// sender's number for it, which a post must carry: a resend of one already accepted
    /// is not stored again.
    pub(crate) async fn post(
        &self,
        state: &AppState,
        conversation: Conversation<'_>,
        to: &str,
        sender: &str,
        n: Option<u64>,
        body: Vec<u8>,
    ) -> ApiResult<()> {
        let n = n.and_then(|n| i64::try_from(n).ok()).ok_or_else(|| {
            ApiError::bad(
                "n",
                "give the message's number, counting the sender's messages to this addressee from 0",
            )
        })?;
        let conversation = conversation.name();
        let mailbox = baygrid_store::mailbox(&conversation, to);
        let acknowledged = self.lock().get(&mailbox).copied().unwrap_or(0);
        let message = RelayMessage {
            conversation,
            mailbox,
            sender: sender.to_string(),
            n,
            body,
        };
        match state.store.relay_post(message, acknowledged).await? {
            Posted::Accepted(_) => self.signal.notify_waiters(),
            Posted::Again => {
                tracing::info!(to, sender, n, "a relay message sent again, kept once")
            }
        }
        Ok(())
    }

    /// A conversation ended (the store dropped its mailboxes with the ending): its
    /// receivers are answered now.
    pub(crate) fn ended(&self, conversation: Conversation<'_>) {
        let prefix = format!("{}/", conversation.name());
        self.lock()
            .retain(|mailbox, _| !mailbox.starts_with(&prefix));
        self.signal.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.acknowledged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The messages to `addressee` from `from` on as one body
    /// (`baygrid_api::relay::frame`), waiting up to `wait` for one; those before `from` are
    /// acknowledged.
    pub(crate) async fn receive(
        &self,
        state: &AppState,
        conversation: Conversation<'_>,
        addressee: &str,
        from: usize,
        wait: Duration,
    ) -> ApiResult<Vec<u8>> {
        let mailbox = baygrid_store::mailbox(&conversation.name(), addressee);
        if from > 0 {
            let mut acknowledged = self.lock();
            let below = acknowledged.entry(mailbox.clone()).or_default();
            *below = (*below).max(from as i64);
        }
        let mailbox = &mailbox;
        crate::queries::long_poll(state, &self.signal, wait, || async move {
            let waiting = state.store.relay_messages(mailbox, from as i64).await?;
            Ok((baygrid_api::relay::frame(&waiting), !waiting.is_empty()))
        })
        .await
    }
}
