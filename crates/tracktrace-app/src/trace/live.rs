//! Live timeline entries: a tenant's captured events in log order, as [`TimelineEntry`]s,
//! from a position on (catch-up, then live on the store's head notifications), for front ends
//! that push them (Server-Sent Events).

use std::sync::Arc;

use futures_util::Stream;
use tracktrace_core::{
    EventFilter, EventStore, Position, SubscribeOptions, Subscription, TenantId,
};
use tracktrace_domain::{ENTITY_STREAM_PREFIX, OPERATIONAL_EVENT};

use crate::trace::model::{TimelineEntry, entry_of};

/// Which entries a live stream carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveFilter {
    /// Only this entity's entries.
    pub entity_id: Option<String>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
}

/// The entries of `tenant` from position `from` on, with their positions. The stream ends when
/// the store's subscription fails (logged); a front end resumes after the last position it
/// delivered.
pub fn entries(
    store: Arc<dyn EventStore>,
    tenant: TenantId,
    from: Position,
    filter: LiveFilter,
) -> impl Stream<Item = (Position, TimelineEntry)> + Send + 'static {
    let sub = Subscription::new(
        store,
        SubscribeOptions {
            from,
            filter: EventFilter {
                tenant: Some(tenant),
                event_types: vec![OPERATIONAL_EVENT.into()],
                stream_prefix: Some(ENTITY_STREAM_PREFIX.into()),
            },
            batch_size: 256,
        },
    );
    futures_util::stream::unfold((sub, filter), |(mut sub, filter)| async move {
        loop {
            let e = match sub.next().await {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, "live timeline subscription ended");
                    return None;
                }
            };
            let Some((entry, entity_id)) = entry_of(&e) else {
                continue;
            };
            if filter.entity_id.as_ref().is_some_and(|id| *id != entity_id)
                || (!filter.event_types.is_empty()
                    && !filter.event_types.contains(&entry.event_type))
            {
                continue;
            }
            return Some(((e.position, entry), (sub, filter)));
        }
    })
}
