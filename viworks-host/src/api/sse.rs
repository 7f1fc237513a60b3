//! `GET /api/v1/jobs/{id}/events` as server-sent events: first one `state` event per command
//! with its current state, then one per durable change, then `end` once every command is
//! terminal, and the stream closes. A comment every 15 s keeps proxies from timing it out.
//!
//! Bounded: at most [`super::server::MAX_STREAMS`] streams at once, and each buffers at most
//! 32 events for a slow reader; when the change feed runs ahead of a stream, the stream
//! re-reads the job from the store and carries on, so it never misses a final state.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{CACHE_CONTROL, HeaderValue};
use tokio::sync::{Semaphore, broadcast, mpsc};
use viworks_core::idempotency::JobId;
use viworks_core::wire::CommandId;

use super::response::{self, Body};
use super::server::stopped;
use super::{ApiError, ApiState, views};
use crate::store::{Store, StoredCommand};

/// Events buffered for one slow reader.
const BUFFER: usize = 32;

/// A comment is sent when nothing else was for this long.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a stream last told its reader about each command.
struct Sent {
    states: BTreeMap<CommandId, (&'static str, bool)>,
}

impl Sent {
    /// The event for `stored` if its state is news to the reader.
    fn news(&mut self, stored: &StoredCommand) -> Option<Bytes> {
        let name = views::state_name(&stored.record.state);
        let id = stored.record.command.command_id.clone();
        let previous = self.states.insert(id, (name, views::is_terminal(stored)));
        (previous.map(|(last, _)| last) != Some(name)).then(|| event("state", &views::command(stored)))
    }

    fn complete(&self) -> bool {
        self.states.values().all(|(_, terminal)| *terminal)
    }
}

/// Opens the event stream of `job`. Fails with 404 when the job does not exist and 503 when
/// too many streams are open.
pub(super) async fn job_events<S: Store + Clone>(
    state: &ApiState<S>,
    job: JobId,
    streams: &Arc<Semaphore>,
) -> Result<hyper::Response<Body>, ApiError> {
    let permit = Arc::clone(streams)
        .try_acquire_owned()
        .map_err(|_| ApiError::Unavailable("too many event streams are open; retry later"))?;
    // Subscribe before reading, so that no change can fall between the read and the stream.
    let mut changes = state.control.subscribe();
    let store = state.control.store().clone();
    let Some((_, commands)) = store.job(&job).await? else {
        return Err(ApiError::NotFound(format!("no job {job}")));
    };
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut sent = Sent { states: BTreeMap::new() };
        for command in &commands {
            if let Some(bytes) = sent.news(command)
                && tx.send(bytes).await.is_err()
            {
                return;
            }
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        while !sent.complete() {
            let update = tokio::select! {
                change = changes.recv() => change,
                () = stopped(&mut shutdown) => return,
                () = tx.closed() => return,
                _ = keep_alive.tick() => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let fresh = match update {
                Ok(record) if sent.states.contains_key(&record.command.command_id) => {
                    match store.command(&record.command.command_id).await {
                        Ok(Some(stored)) => vec![stored],
                        _ => continue,
                    }
                }
                Ok(_) => continue,
                // Fell behind the feed: the store has every state that was published.
                Err(broadcast::error::RecvError::Lagged(_)) => match store.job(&job).await {
                    Ok(Some((_, commands))) => commands,
                    _ => return,
                },
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for stored in &fresh {
                if let Some(bytes) = sent.news(stored)
                    && tx.send(bytes).await.is_err()
                {
                    return;
                }
            }
            keep_alive.reset();
        }
        let _ = tx.send(event("end", &serde_json::json!({ "job_id": job, "complete": true }))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut response = response::with_body(200, "text/event-stream", StreamBody::new(stream).boxed());
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response.headers_mut().insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One server-sent event; the JSON has no newline, so it fits one `data:` line.
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_named_block_with_one_data_line() {
        let bytes = event("state", &serde_json::json!({ "output": "a\nb" }));
        assert_eq!(&bytes[..], b"event: state\ndata: {\"output\":\"a\\nb\"}\n\n");
    }
}
