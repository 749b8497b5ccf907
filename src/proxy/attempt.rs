//! One attempt on one backend, in steps: connect (lend a stream on a pooled connection), send
//! the request headers, wait for the response headers, stream the response. The request body
//! is uploaded beside the last two. Each step ends in an [`Outcome`]; `outcome.rs` decides what
//! it means.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, SendStream};
use http::Response;
use tokio::time::{sleep_until, Instant, Sleep};
use tracing::{debug, info};

use super::call::{AttemptEnd, Call, Downstream};
use super::forward::{self, HeldBody, PipeError, Replay, Seen};
use super::hedge::{Hedger, Launched};
use super::outcome::{self, Legs, Outcome, RetryReason};
use crate::balance::{Backend, Cluster, InFlight};
use crate::telemetry::trace::TRACEPARENT;
use crate::transport::leg::{
    self, RecvStream as UpRecv, ResponseFuture, SendStream as UpSend, Sender,
};
use crate::transport::{H2Settings, StreamSlot};
use crate::wire::{self, Code, ProxyStatus};

/// What an attempt starts from: a backend the balancer picked (with its slot), or a hedge
/// that answered first, which carries on from its response headers.
pub(super) enum Start<'b> {
    Picked(&'b Arc<Backend>, InFlight),
    Hedge(Box<Launched>),
}

impl Call {
    /// Sends the call to one backend and forwards it to the end, unless it must be retried
    /// (or a hedge answered first: the attempts loop carries on with it).
    pub(super) async fn attempt(
        &mut self,
        down: &mut Downstream,
        start: Start<'_>,
        replay: &mut Replay,
    ) -> AttemptEnd {
        // One timer for the whole attempt: connecting, waiting, streaming.
        let mut deadline = pin!(sleep_until(self.deadline));
        let (hedge_backend, slot);
        let (backend, mut in_flight, picked_at, sent) = match start {
            Start::Picked(backend, mut in_flight) => {
                let picked_at = Instant::now();
                let mut legs = Legs::new(backend, picked_at, in_flight.load());
                let sender = match self.connect(down, backend, deadline.as_mut()).await {
                    Ok((sender, lent)) => {
                        slot = lent;
                        sender
                    }
                    Err(outcome) => return self.settle(down, legs, outcome),
                };
                legs.slot = Some(&slot);
                in_flight.sent(&self.method.latency);
                match send_headers(self, down, backend, sender, replay) {
                    Ok(sent) => (backend, in_flight, picked_at, sent),
                    Err(outcome) => return self.settle(down, legs, outcome),
                }
            }
            Start::Hedge(launched) => {
                let (backend, in_flight, picked_at, lent, sent) = resume(*launched, replay);
                (hedge_backend, slot) = (backend, lent);
                (&hedge_backend, in_flight, picked_at, sent)
            }
        };
        let mut legs = Legs::new(backend, picked_at, in_flight.load());
        legs.slot = Some(&slot);
        let Sent {
            response,
            mut up_send,
            request_ended,
            sent_at,
            answered_after,
            hedger,
        } = sent;
        let mut down_send = None;
        // Time to the response headers: how the backend's latency is judged, once the
        // attempt's outcome says whether it failed (outcome.rs).
        let mut headers_after = None;
        let outcome = {
            let answered = AtomicBool::new(false);
            let Downstream {
                request,
                body,
                respond,
                bytes_in,
                web: _,
            } = &mut *down;
            // Boxed, and dropped as soon as it ends: a long-lived stream (a server stream, a
            // watch) does not keep an upload that finished long ago.
            let upload = (!request_ended).then(|| {
                Box::pin(forward::upload(
                    body,
                    &mut up_send,
                    replay,
                    &answered,
                    bytes_in,
                ))
            });
            let mut exchange = Exchange {
                respond,
                upload,
                uploaded: None,
                request_ended,
                hedger,
                deadline: deadline.as_mut(),
                deadline_at: self.deadline,
            };
            // Decided without holding the response across the streaming below: what an
            // await spans stays in every call's future for its whole life.
            let headers = exchange.await_headers(response).await;
            self.hedges_done(exchange.hedger.take(), &headers);
            let streaming = match headers {
                Err(outcome) => Err(outcome),
                Ok(Err(error)) => {
                    // Lost at once: the backend was gone before the request reached it.
                    let retry_lost = self.cluster.settings.retry_lost_connection
                        && sent_at.elapsed() <= outcome::LOST_AT_ONCE;
                    Err(outcome::before_headers(
                        &error,
                        &backend.address,
                        retry_lost,
                    ))
                }
                Ok(Ok(response)) => {
                    let after_send = answered_after
                        .unwrap_or_else(|| self.answered(&mut in_flight, picked_at, sent_at));
                    headers_after = Some(after_send);
                    let answered = Answered {
                        request,
                        flag: &answered,
                    };
                    self.accept_answer(response, backend, answered, &mut exchange)
                }
            };
            match streaming {
                Err(outcome) => outcome,
                Ok((mut up_recv, sink)) => {
                    let sink = down_send.insert(sink);
                    let bytes_out = &mut self.summary.bytes_out;
                    exchange
                        .stream_response(&mut up_recv, sink, bytes_out)
                        .await
                }
            }
        };
        drop(in_flight);
        legs.upstream = Some(&mut up_send);
        legs.downstream = down_send.as_mut();
        legs.headers_after = headers_after;
        self.settle(down, legs, outcome)
    }

    /// The backend's response headers came: the call no longer counts against its limit, and
    /// the time they took teaches the balancer (and, on a hedging route, the delay).
    fn answered(&self, in_flight: &mut InFlight, picked_at: Instant, sent_at: Instant) -> Duration {
        let after_send = sent_at.elapsed();
        in_flight.answered(sent_at - picked_at + after_send);
        if self.hedging.is_some() {
            self.method.latency.percentiles.record(after_send);
        }
        after_send
    }

    /// The first attempt's wait is over: hedges still in flight are cancelled, and counted
    /// with the call's attempts and spans. A hedge that answered first stays, as the attempt
    /// the call carries on with.
    fn hedges_done(
        &mut self,
        hedger: Option<Box<Hedger>>,
        headers: &Result<Result<Response<UpRecv>, h2::Error>, Outcome>,
    ) {
        let Some(hedger) = hedger else { return };
        self.summary.attempts += hedger.sent();
        let winner = match headers {
            Err(Outcome::HedgeWon(launched)) => Some(&launched.backend),
            _ => None,
        };
        let spans = hedger.finish(winner);
        if let Some(trace) = self.summary.trace.as_mut() {
            trace.attempts.extend(spans);
        }
    }

    /// The backend's response headers: kept for a retry if `retryable_answer` says so;
    /// otherwise forwarded to the client, and from then on no retry can follow, so the upload
    /// stops holding the body and the request goes (unless the access log needs it).
    fn accept_answer<'a, U: Future<Output = Uploaded<'a>>>(
        &self,
        response: Response<UpRecv>,
        backend: &Backend,
        answered: Answered<'_>,
        exchange: &mut Exchange<'a, U>,
    ) -> Result<(UpRecv, SendStream<Bytes>), Outcome> {
        let response = self.retryable_answer(response, &backend.address)?;
        answered.flag.store(true, Ordering::Relaxed);
        if let Some(replay) = exchange.uploaded.take() {
            replay.release();
        }
        if !self.keep_request {
            *answered.request = None;
        }
        let mut response = response;
        if let Some(header) = &self.cluster_header {
            if let Ok(value) = http::HeaderValue::from_str(&self.cluster.name) {
                response.headers_mut().insert(header.clone(), value);
            }
        }
        exchange.send_head(response)
    }

    /// A trailers-only answer whose status `retry.retry_on` names, before anything went to
    /// the client, is kept for a retry (`Err`); any other response goes on (`Ok`).
    fn retryable_answer(
        &self,
        response: Response<UpRecv>,
        address: &crate::config::BackendAddr,
    ) -> Result<Response<UpRecv>, Outcome> {
        if self.cluster.settings.retry_on == 0 || !response.body().is_end_stream() {
            return Ok(response);
        }
        let code = Code::of_headers(response.headers());
        if !self.cluster.settings.retries_on(code) {
            return Ok(response);
        }
        let (head, _) = response.into_parts();
        Err(Outcome::Retry(RetryReason::Answered {
            address: address.0.clone(),
            code,
            head: Box::new(head),
        }))
    }

    /// Lends a ready stream on a pooled connection (opening one if needed), bounded by the
    /// deadline; the client may leave meanwhile. `ready` waits only if h2 counts the peer's
    /// stream limit lower than we do (before its SETTINGS arrive).
    async fn connect(
        &self,
        down: &mut Downstream,
        backend: &Backend,
        deadline: Pin<&mut Sleep>,
    ) -> Result<(Sender, StreamSlot), Outcome> {
        let lend = lend(backend, &self.cluster, &self.h2);
        tokio::select! {
            // The deadline first: when it and a connect timeout fire together, the deadline
            // is the answer.
            biased;
            _ = deadline => Err(Outcome::DeadlineExceeded),
            reset = poll_fn(|cx| down.respond.poll_reset(cx)) => {
                debug!(reason = ?reset.as_ref().ok(), "client left while connecting");
                Err(Outcome::ClientGone(reset.unwrap_or(Reason::CANCEL)))
            }
            lent = lend => lent,
        }
    }
}

/// A hedge that answered first, as an attempt whose request went out and was answered. It
/// sent the whole request, and an answer came: no retry can need the replay now.
fn resume(
    launched: Launched,
    replay: &mut Replay,
) -> (Arc<Backend>, InFlight, Instant, StreamSlot, Sent) {
    replay.release();
    let sent = Sent {
        response: Answer::Ready(Some(launched.response)),
        up_send: launched.up_send,
        request_ended: true,
        sent_at: launched.picked_at,
        answered_after: Some(launched.answered_after),
        hedger: None,
    };
    let Launched {
        backend,
        in_flight,
        slot,
        picked_at,
        ..
    } = launched;
    (backend, in_flight, picked_at, slot, sent)
}

/// Lends a ready stream on a pooled connection to `backend`, opening one if needed.
pub(super) async fn lend(
    backend: &Backend,
    cluster: &Cluster,
    h2: &H2Settings,
) -> Result<(Sender, StreamSlot), Outcome> {
    let address = &backend.address.0;
    let policy = &cluster.settings.upstream;
    // Opening a connection (TCP, TLS and HTTP/2 handshakes) is a large future: boxed, so that
    // a call does not carry its size for its whole life, only when it opens.
    let acquired = match backend.transport.try_lend() {
        Some(lent) => Ok(lent),
        None => Box::pin(backend.transport.acquire(address, policy, h2)).await,
    };
    let (sender, slot) = acquired.map_err(Outcome::ConnectFailed)?;
    if backend.connect_succeeded() {
        info!(cluster = %cluster.name, backend = %address, "backend healthy again");
    }
    match sender.ready().await {
        Ok(sender) => Ok((sender, slot)),
        Err(_) => {
            slot.mark_broken();
            Err(Outcome::Retry(RetryReason::GoAway(address.clone())))
        }
    }
}

/// An attempt's request, sent: the response to wait for, the stream to upload on, whether
/// the request has ended, and the hedges that may follow it.
struct Sent {
    response: Answer,
    up_send: UpSend,
    request_ended: bool,
    sent_at: Instant,
    /// A hedge that answered first: how long its answer took (already counted).
    answered_after: Option<Duration>,
    hedger: Option<Box<Hedger>>,
}

/// Sends the request headers upstream: the client's, with the remaining budget as
/// `grpc-timeout`. Hop-by-hop headers (connection, upgrade, te other than trailers, ...) need
/// no stripping: h2 rejects a header block that carries them as malformed before we see it.
/// Returns the response future, the upstream send stream, whether the request has ended
/// (only if no earlier attempt read part of the body: that part is replayed first), and, on
/// a route that hedges, the first attempt's hedger.
fn send_headers(
    call: &Call,
    down: &Downstream,
    backend: &Arc<Backend>,
    mut sender: Sender,
    replay: &Replay,
) -> Result<Sent, Outcome> {
    let Some(request) = down.request.as_deref() else {
        // Not reached: the request is freed only after an answer, and no attempt follows one.
        // Should it be, the call fails with INTERNAL and the connection stays in the pool.
        let message = "sluice: the request was freed before this attempt".to_string();
        return Err(Outcome::BackendFailed {
            status: ProxyStatus::new(Code::Internal, message),
            broken: false,
        });
    };
    let remaining = call.deadline.saturating_duration_since(Instant::now());
    let trace = call.summary.trace.as_ref();
    // Sent in place of the client's fields of the same names.
    let extra = [
        Some((wire::GRPC_TIMEOUT, wire::encode_timeout(remaining))),
        trace
            .and_then(|t| t.latest_traceparent())
            .map(|traceparent| (TRACEPARENT, traceparent)),
        // gRPC's retry header (gRFC A6): attempts made before this one, for a retry.
        (call.summary.attempts.checked_sub(1).filter(|n| *n > 0))
            .map(|before| (wire::GRPC_PREVIOUS_RPC_ATTEMPTS, before.into())),
    ];
    let hedger = call.hedger(request, backend);
    let request_ended = replay.is_empty() && down.body.is_end_stream();
    match leg::send_request(&mut sender, request, &extra, request_ended) {
        Ok((response, up_send)) => Ok(Sent {
            response: Answer::Pending(response),
            up_send,
            request_ended,
            sent_at: Instant::now(),
            answered_after: None,
            hedger,
        }),
        Err(error) => {
            debug!(%error, backend = %backend.address, "send_request failed");
            Err(Outcome::Retry(RetryReason::GoAway(
                backend.address.0.clone(),
            )))
        }
    }
}

/// What an upload ends with: the replay it held (to free at the answer), or how it failed.
type Uploaded<'a> = Result<&'a mut Replay, PipeError>;

/// The upload's end (never, when there is none). A `select!` branch evaluates its future
/// even while disabled, so this must not fail on `None`.
fn uploading<U: Future>(upload: &mut Option<Pin<Box<U>>>) -> impl Future<Output = U::Output> + '_ {
    poll_fn(move |cx| match upload {
        Some(upload) => upload.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

/// The backend's response headers: awaited, or already here (a hedge that answered first).
enum Answer {
    Pending(ResponseFuture),
    Ready(Option<Response<UpRecv>>),
}

impl Future for Answer {
    type Output = Result<Response<UpRecv>, h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Pending(response) => Pin::new(response).poll(cx),
            Answer::Ready(response) => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        }
    }
}

/// What a hedger has to say: a hedge is due, or one answered first.
enum HedgeEvent {
    Due,
    Answered(Box<Launched>),
}

/// The hedger's next event (never, when there is none).
fn hedging(hedger: &mut Option<Box<Hedger>>) -> impl Future<Output = HedgeEvent> + '_ {
    poll_fn(move |cx| {
        let Some(hedger) = hedger else {
            return Poll::Pending;
        };
        if let Poll::Ready(launched) = hedger.poll_answer(cx) {
            return Poll::Ready(HedgeEvent::Answered(Box::new(launched)));
        }
        hedger.poll_due(cx).map(|()| HedgeEvent::Due)
    })
}

/// What changes once the backend has answered: the flag the upload reads, and the request.
struct Answered<'a> {
    request: &'a mut Option<Box<http::request::Parts>>,
    flag: &'a AtomicBool,
}

/// The middle of an attempt: the client's response handle, the upload beside it, and the
/// attempt's deadline.
struct Exchange<'a, U> {
    respond: &'a mut SendResponse<Bytes>,
    /// The upload of the request body, running beside the wait for the response; `None`
    /// once it has ended (or when there was nothing to upload).
    upload: Option<Pin<Box<U>>>,
    /// The replay of a request that ended before the answer: kept for a retry until the
    /// answer, then freed (`accept_answer`).
    uploaded: Option<&'a mut Replay>,
    /// The request ended with its headers: there is no body to upload.
    request_ended: bool,
    /// The hedges of a first attempt on a route that hedges.
    hedger: Option<Box<Hedger>>,
    deadline: Pin<&'a mut Sleep>,
    /// When `deadline` fires. The timer has millisecond resolution, so it can fire after an
    /// answer the backend gave on its own expiry of the `grpc-timeout` sluice sent (tonic
    /// answers CANCELLED then); such an answer arrives after this instant by construction.
    deadline_at: Instant,
}

impl<'a, U: Future<Output = Uploaded<'a>>> Exchange<'a, U> {
    /// Waits for the backend's response headers while the upload runs, and hedges when due.
    async fn await_headers(
        &mut self,
        response: Answer,
    ) -> Result<Result<Response<UpRecv>, h2::Error>, Outcome> {
        let mut response = pin!(response);
        loop {
            tokio::select! {
                biased;
                // The client reset the stream or its connection went away.
                reset = poll_fn(|cx| self.respond.poll_reset(cx)) => {
                    return Err(Outcome::ClientGone(reset.unwrap_or(Reason::CANCEL)));
                }
                _ = &mut self.deadline => return Err(Outcome::DeadlineExceeded),
                // The request body ended, or the client failed while sending it.
                result = uploading(&mut self.upload), if self.upload.is_some() => {
                    if let Some(outcome) = self.upload_ended(result, false) {
                        return Err(outcome);
                    }
                }
                // A hedge is due, or one answered first.
                event = hedging(&mut self.hedger), if self.hedger.is_some() => match event {
                    HedgeEvent::Due => {
                        let body = self.held_body();
                        let upload_running = self.upload.is_some();
                        if let Some(hedger) = self.hedger.as_mut() {
                            hedger.on_due(body, upload_running);
                        }
                    }
                    HedgeEvent::Answered(launched) => {
                        return Err(Outcome::HedgeWon(launched));
                    }
                },
                // The backend's response headers, or its failure.
                result = &mut response => {
                    // The client's deadline has passed, whatever the timer says: that is
                    // what it must hear.
                    if Instant::now() >= self.deadline_at {
                        return Err(Outcome::DeadlineExceeded);
                    }
                    return Ok(result);
                }
            }
        }
    }

    /// The whole request, once it has arrived and the replay holds all of it: what a hedge
    /// sends.
    fn held_body(&self) -> Option<HeldBody> {
        if self.upload.is_some() {
            return None;
        }
        match &self.uploaded {
            Some(replay) => replay.whole_body(),
            None if self.request_ended => Some(HeldBody::default()),
            None => None,
        }
    }

    /// The upload ended: drops it, and keeps its replay for a retry until the backend has
    /// `answered`, or frees it at once after that. Only the client leaving ends the attempt.
    fn upload_ended(&mut self, result: Uploaded<'a>, answered: bool) -> Option<Outcome> {
        self.upload = None;
        match result {
            Ok(replay) if answered => replay.release(),
            Ok(replay) => self.uploaded = Some(replay),
            Err(error) => return outcome::upload_failed(error),
        }
        None
    }

    /// Sends the backend's response headers to the client. Returns the response body to
    /// stream, and the client's stream to stream it to, unless the response was trailers-only
    /// (then, or on failure, the outcome).
    fn send_head(
        &mut self,
        response: Response<UpRecv>,
    ) -> Result<(UpRecv, SendStream<Bytes>), Outcome> {
        let (parts, up_recv) = response.into_parts();
        let trailers_only = up_recv.is_end_stream();
        // A trailers-only response carries its status in the headers.
        let status = match trailers_only {
            true => Code::of_headers(&parts.headers),
            false => Code::Ok,
        };
        let head = Response::from_parts(parts, ());
        match self.respond.send_response(head, trailers_only) {
            Err(error) => Err(Outcome::ClientGone(outcome::client_reason(&error))),
            Ok(_) if trailers_only => Err(Outcome::Finished(status)),
            Ok(stream) => Ok((up_recv, stream)),
        }
    }

    /// Pipes the response to the client until its trailers, the deadline, or a failure.
    async fn stream_response(
        &mut self,
        source: &mut UpRecv,
        sink: &mut SendStream<Bytes>,
        bytes_out: &mut u64,
    ) -> Outcome {
        let mut download = pin!(forward::pipe(source, sink, |seen| {
            if let Seen::Data(chunk) = seen {
                *bytes_out += chunk.len() as u64;
            }
        }));
        loop {
            tokio::select! {
                biased;
                _ = &mut self.deadline => break Outcome::DeadlineExceeded,
                // The request body ended (after the answer: no retry can need it now), or
                // the client failed while sending it.
                result = uploading(&mut self.upload), if self.upload.is_some() => {
                    if let Some(outcome) = self.upload_ended(result, true) {
                        break outcome;
                    }
                }
                // The response ended (trailers or END_STREAM), or one side failed.
                result = &mut download => break outcome::response_ended(result),
            }
        }
    }
}
