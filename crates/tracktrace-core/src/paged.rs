//! Paged reads as a [`futures_core::Stream`]: a long stream or the log up to its head, one
//! page in memory at a time ([`PagedReads::read_stream_pages`],
//! [`PagedReads::read_all_pages`]), on every backend.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::id::{Position, Version};
use crate::store::{AllPage, Direction, EventFilter, EventStore, ReadAll, ReadStream};

/// Reads of any [`EventStore`] as streams of events, one page in memory at a time
/// (implemented for every store).
pub trait PagedReads: EventStore {
    /// The events `req` selects (direction, start, limit) as a [`futures_core::Stream`], read
    /// `page_size` events at a time: a stream of any length with one page in memory.
    ///
    /// ```
    /// # use tracktrace_core::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<()> {
    /// use std::future::poll_fn;
    /// use std::pin::pin;
    /// use futures_core::Stream;
    ///
    /// let store = InMemoryStore::new();
    /// let (tenant, stream) = (TenantId::from_static("acme"), StreamId::from_static("Bag-1"));
    /// let events = (0..10).map(|i| NewEvent::json("Scanned", &serde_json::json!({ "i": i }))).collect();
    /// store.append_to(&tenant, &stream, ExpectedVersion::NoStream, events).await?;
    ///
    /// let mut pages = pin!(store.read_stream_pages(ReadStream::forwards(tenant, stream), 4));
    /// let mut versions = Vec::new();
    /// while let Some(e) = poll_fn(|cx| pages.as_mut().poll_next(cx)).await {
    ///     versions.push(e?.version.get());
    /// }
    /// assert_eq!(versions, (1..=10).collect::<Vec<_>>());
    /// # Ok(()) }
    /// ```
    fn read_stream_pages(&self, req: ReadStream, page_size: usize) -> EventPages<'_, Self> {
        EventPages::stream(self, req, page_size)
    }

    /// The events of the global log from `from` that match `filter`, up to the head as it is
    /// when each page is read, as a [`futures_core::Stream`] read `page_size` events at a
    /// time. (A [`Subscription`](crate::Subscription) goes on with live events after the head.)
    fn read_all_pages(
        &self,
        from: Position,
        filter: EventFilter,
        page_size: usize,
    ) -> EventPages<'_, Self> {
        EventPages::all(self, from, filter, page_size)
    }
}

impl<S: EventStore + ?Sized> PagedReads for S {}

type PageFuture<'a> = Pin<Box<dyn Future<Output = Result<Page>> + Send + 'a>>;

/// One page, whether it was the last, and (for the log) where the next page starts.
struct Page {
    events: Vec<RecordedEvent>,
    last: bool,
    next: Option<Position>,
}

/// Where the next page starts.
enum Cursor {
    Stream {
        req: ReadStream,
        /// Events still wanted (the request's own limit).
        remaining: usize,
    },
    All {
        from: Position,
        filter: EventFilter,
    },
}

/// The events of a paged read, one page in memory at a time. Pages are read lazily, when the
/// consumer has taken every event of the previous one. The first error ends the stream; a page
/// that does not start at or past where the previous one ended (a broken backend) is an
/// [`Error::Backend`], not an endless stream.
///
/// Built by [`PagedReads::read_stream_pages`] and [`PagedReads::read_all_pages`].
#[must_use = "streams do nothing unless polled"]
pub struct EventPages<'a, S: ?Sized> {
    store: &'a S,
    page_size: usize,
    cursor: Cursor,
    buffered: VecDeque<RecordedEvent>,
    pending: Option<PageFuture<'a>>,
    done: bool,
}

impl<S: ?Sized> fmt::Debug for EventPages<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventPages")
            .field("page_size", &self.page_size)
            .field("buffered", &self.buffered.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<'a, S: EventStore + ?Sized> EventPages<'a, S> {
    pub(crate) fn stream(store: &'a S, req: ReadStream, page_size: usize) -> Self {
        let remaining = req.limit;
        Self::new(store, page_size, Cursor::Stream { req, remaining })
    }

    pub(crate) fn all(store: &'a S, from: Position, filter: EventFilter, page_size: usize) -> Self {
        Self::new(store, page_size, Cursor::All { from, filter })
    }

    fn new(store: &'a S, page_size: usize, cursor: Cursor) -> Self {
        Self {
            store,
            page_size: page_size.max(1),
            cursor,
            buffered: VecDeque::new(),
            pending: None,
            done: false,
        }
    }

    /// The read of the next page, moving the cursor past it.
    fn next_page(&mut self) -> PageFuture<'a> {
        let store = self.store;
        let size = self.page_size;
        match &mut self.cursor {
            Cursor::Stream { req, remaining } => {
                let mut page_req = req.clone();
                page_req.limit = size.min(*remaining);
                let wanted = page_req.limit;
                Box::pin(async move {
                    let events = store.read_stream(page_req).await?;
                    Ok(Page {
                        last: events.len() < wanted,
                        events,
                        next: None,
                    })
                })
            }
            Cursor::All { from, filter } => {
                let req = ReadAll::starting_at(*from, size).filter(filter.clone());
                Box::pin(async move {
                    let AllPage { events, next } = store.read_all(req).await?;
                    Ok(Page {
                        last: events.len() < size,
                        events,
                        next: Some(next),
                    })
                })
            }
        }
    }

    /// Moves the cursor past `page`.
    fn advance(&mut self, page: &Page) {
        match &mut self.cursor {
            Cursor::Stream { req, remaining } => {
                *remaining -= page.events.len().min(*remaining);
                if let Some(last) = page.events.last() {
                    req.from = match req.direction {
                        Direction::Forwards => Some(last.version.next()),
                        Direction::Backwards => match last.version.get() {
                            0 | 1 => {
                                *remaining = 0;
                                None
                            }
                            v => Some(Version::new(v - 1)),
                        },
                    };
                }
            }
            Cursor::All { from, .. } => {
                if let Some(next) = page.next {
                    *from = next;
                }
            }
        }
    }

    /// What is wrong with `page` if it does not start at or past the cursor (a backend that
    /// ignores the start would otherwise make the stream repeat itself forever).
    fn violation(&self, page: &Page) -> Option<String> {
        let first = page.events.first()?;
        match &self.cursor {
            Cursor::Stream { req, .. } => {
                let from = req.from?;
                let behind = match req.direction {
                    Direction::Forwards => first.version < from,
                    Direction::Backwards => first.version > from,
                };
                behind.then(|| {
                    format!(
                        "read_stream from version {from} returned version {} first",
                        first.version
                    )
                })
            }
            Cursor::All { from, .. } => (first.position < *from
                || page.next.is_some_and(|next| !page.last && next <= *from))
            .then(|| {
                format!(
                    "read_all from position {from} returned position {} first",
                    first.position
                )
            }),
        }
    }

    fn exhausted(&self) -> bool {
        matches!(self.cursor, Cursor::Stream { remaining: 0, .. })
    }
}

impl<S: EventStore + ?Sized> Stream for EventPages<'_, S> {
    type Item = Result<RecordedEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.buffered.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.done || this.exhausted() {
                this.done = true;
                return Poll::Ready(None);
            }
            if this.pending.is_none() {
                this.pending = Some(this.next_page());
            }
            let Some(fut) = this.pending.as_mut() else {
                unreachable!("a page read was just started")
            };
            let page = match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.pending = None;
                    match r {
                        Ok(page) => page,
                        Err(e) => {
                            this.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            };
            if let Some(detail) = this.violation(&page) {
                this.done = true;
                return Poll::Ready(Some(Err(Error::Backend {
                    message: format!("paged read stopped: {detail}"),
                    source: None,
                })));
            }
            this.advance(&page);
            this.done = page.last;
            this.buffered.extend(page.events);
        }
    }
}
