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

use crate::error::ApiResult;
use crate::AppState;

#[derive(Default)]
pub(crate) struct Relay {
    /// Fires when a message arrives or mailboxes are dropped.
    pub(crate) signal: tokio::sync::Notify,
    /// By mailbox: its messages below this number were acknowledged.
    acknowledged: std::sync::Mutex<HashMap<String, i64>>,
}

impl Relay {
    /// Stores `message` durably (a resend of one already accepted is not stored again) and
    /// wakes the receivers.
    pub(crate) async fn post(&self, state: &AppState, mut message: RelayMessage) -> ApiResult<()> {
        message.acknowledged = self.acknowledged_in(&message.mailbox);
        let (mailbox, sender, n) = (message.mailbox.clone(), message.sender.clone(), message.n);
        match state.store.relay_post(message).await? {
            Posted::Accepted(_) => self.signal.notify_waiters(),
            Posted::Again => {
                tracing::info!(mailbox, sender, n, "a relay message sent again, kept once")
            }
        }
        Ok(())
    }

    /// A conversation ended (the store dropped its mailboxes with the ending): its
    /// receivers are answered now.
    pub(crate) fn ended(&self, conversation: &str) {
        let prefix = format!("{conversation}/");
        self.lock()
            .retain(|mailbox, _| !mailbox.starts_with(&prefix));
        self.signal.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.acknowledged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn acknowledged_in(&self, mailbox: &str) -> i64 {
        self.lock().get(mailbox).copied().unwrap_or(0)
    }

    /// The messages in `mailbox` from `from` on as one body (`baygrid_api::relay::frame`),
    /// waiting up to `wait` for one.
    pub(crate) async fn receive(
        &self,
        state: &AppState,
        mailbox: &str,
        from: usize,
        wait: Duration,
    ) -> ApiResult<Vec<u8>> {
        if from > 0 {
            let mut acknowledged = self.lock();
            let below = acknowledged.entry(mailbox.to_string()).or_default();
            *below = (*below).max(from as i64);
        }
        crate::queries::long_poll(state, &self.signal, wait, || async move {
            let waiting = state.store.relay_messages(mailbox, from as i64).await?;
            Ok((baygrid_api::relay::frame(&waiting), !waiting.is_empty()))
        })
        .await
    }
}
