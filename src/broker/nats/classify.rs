//! Which JetStream publish failures are transient and which are lasting refusals.
//!
//! In a cluster, a stream briefly has no leader whenever its leader's node dies or restarts, and
//! the meta group (which answers the JetStream API) has none while it re-elects. Meanwhile a
//! publish gets no responders (a 503 status, which async-nats reports as "no stream found for
//! given subject"), a timeout, or a JetStream error such as "JetStream system temporarily
//! unavailable". None of these says the event is unpublishable: they are
//! [`PublishError::Unavailable`] (retried, then spooled, then drained), never dead letters.
//!
//! Only when the JetStream API itself answers "no stream takes this subject" (a definite empty
//! answer of `$JS.API.STREAM.NAMES` filtered by the subject, see [`confirm`]) does no
//! responders become the lasting refusal `no_stream`. The error codes are the nats-server's
//! (`server/errors.json`).

use std::error::Error as _;
use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, context::PublishErrorKind};
use serde::Deserialize;

use crate::broker::{DlqReason, PublishError};

/// JetStream errors that a leader election, a node restart or a catching-up peer explains.
const TRANSIENT_CODES: &[ErrorCode] = &[
    // JetStream system temporarily unavailable (no meta leader).
    ErrorCode::CLUSTER_NOT_AVAILABLE,
    // JetStream cluster can not handle request (this node is not the leader).
    ErrorCode::CLUSTER_NOT_LEADER,
    // Incomplete results (a peer did not answer).
    ErrorCode::CLUSTER_INCOMPLETE,
    // JetStream cluster not assigned to this server (assignment still propagating).
    ErrorCode::CLUSTER_NOT_ASSIGNED,
    // General RAFT error (proposal dropped during a leader change).
    ErrorCode::RAFT_GENERAL,
    // Stream is offline (its group has no quorum right now).
    ErrorCode(10118),
    // Stream is offline: {reason} (2.12+).
    ErrorCode(10194),
    // Duplicate message id is in process (2.11+): the same id is being stored right now; asked
    // again, the server answers it as a duplicate.
    ErrorCode(10158),
    // Expected last sequence per subject temporarily unavailable (2.11+).
    ErrorCode(10163),
    // Too many requests (2.11+): the stream's leader sheds load.
    ErrorCode(10167),
    // Atomic / batch publish too many in flight (2.14+).
    ErrorCode(10210),
    ErrorCode(10211),
];

/// Answers of NATS 2.11 and later that retrying cannot change: they become `rejected` dead
/// letters like any other refusal the bridge does not name (listed so the tests pin them).
#[cfg(test)]
const LASTING_NEWER_CODES: &[(u64, &str)] = &[
    // Invalid per-message TTL.
    (10165, "invalid per-message TTL"),
    // Per-message TTL is disabled (the stream lost `allow_msg_ttl`).
    (10166, "per-message TTL is disabled"),
    // JetStream minimum API level required (2.12+).
    (10185, "JetStream minimum api level required"),
    // Message stream source header is not allowed (2.14+).
    (10227, "message stream source header is not allowed"),
];

/// The store's answers when a stream's own limits (with `discard = new`) leave no room: all
/// under one code (10077, "store failed"), told apart by the store's words, which nats-server
/// has kept since 2.2.
const FULL_ANSWERS: &[&str] = &[
    "maximum messages exceeded",
    "maximum bytes exceeded",
    "maximum messages per subject exceeded",
];

/// The server's or the account's storage is used up. Not the stream's refusal of this event:
/// the dead-letter stream usually sits on the same storage and would refuse the letter too,
/// so the event waits on the spool (`Unavailable`) until there is room again.
const NO_STORAGE_ANSWERS: &[&str] = &["insufficient resources", "resource limits exceeded"];

/// Whether the server refused a publish because the stream is full: a refusal that lasts
/// until retention or the operator makes room, so it is not retried.
fn is_full(js: &jetstream::Error) -> bool {
    let words = js.to_string();
    FULL_ANSWERS.iter().any(|w| words.contains(w))
}

/// The JetStream error code somewhere in `e`'s chain of sources (a KV error wraps a publish
/// error that wraps the server's answer).
pub(crate) fn jetstream_code(e: &(dyn std::error::Error + 'static)) -> Option<ErrorCode> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(js) = err.downcast_ref::<jetstream::Error>() {
            return Some(js.error_code());
        }
        next = err.source();
    }
    None
}

/// A compare-and-set that named a revision the key no longer has: `wrong last sequence`
/// (10071), or its form without the sequence (10164) that NATS 2.11 and later answer when two
/// writes naming the same revision are in flight on a replicated stream. Another writer got
/// there first: read again and merge again.
pub(crate) fn is_wrong_last_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        jetstream_code(e),
        Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE | WRONG_LAST_SEQUENCE_CONSTANT)
    )
}

/// `wrong last sequence` without the number (NATS 2.11+).
const WRONG_LAST_SEQUENCE_CONSTANT: ErrorCode = ErrorCode(10164);

/// Longest wait for the JetStream API's answer to "which stream takes this subject".
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);

/// Maps a JetStream publish error to transient (`Unavailable`) or lasting (`Refused`).
///
/// No responders comes back as `Refused { NoStream }` only provisionally: the broker calls
/// [`confirm`] before anyone acts on it.
pub(super) fn classify(e: jetstream::context::PublishError) -> PublishError {
    let detail = e.to_string();
    let refused = |reason| PublishError::Refused {
        reason,
        detail: detail.clone(),
    };
    match e.kind() {
        PublishErrorKind::StreamNotFound => refused(DlqReason::NoStream),
        PublishErrorKind::MaxPayloadExceeded => refused(DlqReason::TooLarge),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => PublishError::Unavailable(detail),
        _ => {
            let source = e.source();
            if let Some(js) = source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
                let words = js.to_string();
                if TRANSIENT_CODES.contains(&js.error_code())
                    || NO_STORAGE_ANSWERS.iter().any(|w| words.contains(w))
                {
                    return PublishError::Unavailable(detail);
                }
                if js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM {
                    return refused(DlqReason::TooLarge);
                }
                if is_full(js) {
                    return refused(DlqReason::Full);
                }
                // Any other JetStream answer (a sealed stream, say): retried within the
                // budget, then dead-lettered.
                return refused(DlqReason::Rejected);
            }
            if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
                return refused(DlqReason::Rejected);
            }
            // No JetStream answer at all: the request could not be handed to the connection, or
            // the ack was cut off. The server never judged the event.
            PublishError::Unavailable(detail)
        }
    }
}

/// The answer of `$JS.API.STREAM.NAMES`, or its error.
#[derive(Deserialize)]
struct NamesReply {
    error: Option<ApiError>,
    #[serde(default)]
    total: u64,
    #[serde(default)]
    streams: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    description: String,
    #[serde(default)]
    err_code: u64,
}

/// What the JetStream API says about the streams taking `subject`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StreamsForSubject {
    /// A definite answer: no stream takes it.
    None,
    /// This stream takes it (it has no leader at the moment, or the publish raced its creation).
    Some(String),
}

/// Asks the JetStream API which stream takes `subject`. Errors (no answer in time, no meta
/// leader, an API error) say nothing definite.
pub(super) async fn streams_for_subject(
    js: &jetstream::Context,
    subject: &str,
) -> Result<StreamsForSubject, String> {
    let request = serde_json::json!({ "subject": subject });
    let asked = tokio::time::timeout(
        CONFIRM_TIMEOUT,
        js.request::<_, _, NamesReply>("STREAM.NAMES", &request),
    )
    .await;
    let reply = match asked {
        Err(_) => return Err(format!("no answer within {CONFIRM_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(r)) => r,
    };
    if let Some(e) = reply.error {
        return Err(format!("{} (error code {})", e.description, e.err_code));
    }
    match reply.streams.unwrap_or_default().into_iter().next() {
        Some(name) => Ok(StreamsForSubject::Some(name)),
        None if reply.total == 0 => Ok(StreamsForSubject::None),
        None => Err(format!("{} streams counted but none named", reply.total)),
    }
}

/// Turns a provisional `no_stream` refusal into a transient failure unless the JetStream API
/// confirms that no stream takes `subject`; any other error passes through.
pub(super) async fn confirm(
    js: &jetstream::Context,
    subject: &str,
    error: PublishError,
) -> PublishError {
    let PublishError::Refused {
        reason: DlqReason::NoStream,
        detail,
    } = error
    else {
        return error;
    };
    match streams_for_subject(js, subject).await {
        Ok(StreamsForSubject::None) => PublishError::Refused {
            reason: DlqReason::NoStream,
            detail: format!("{detail}; JetStream confirms that no stream takes {subject}"),
        },
        Ok(StreamsForSubject::Some(stream)) => PublishError::Unavailable(format!(
            "{detail}; stream {stream} takes {subject} but did not answer (no leader right now?)"
        )),
        Err(why) => PublishError::Unavailable(format!(
            "{detail}; JetStream could not confirm that no stream takes {subject}: {why}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn js_error(code: u64, status: usize) -> jetstream::context::PublishError {
        js_error_saying(code, status, "test")
    }

    fn js_error_saying(code: u64, status: usize, words: &str) -> jetstream::context::PublishError {
        let e: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": status, "err_code": code, "description": words
        }))
        .expect("a JetStream error parses");
        jetstream::context::PublishError::with_source(PublishErrorKind::Other, e)
    }

    #[test]
    fn elections_restarts_and_timeouts_are_transient() {
        for code in [10008, 10009, 10004, 10007, 10041, 10118, 10194] {
            assert!(classify(js_error(code, 503)).is_transient(), "{code}");
        }
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
        ] {
            let e = jetstream::context::PublishError::new(kind);
            assert!(classify(e).is_transient());
        }
    }

    #[test]
    fn newer_servers_answers_are_sorted_too() {
        for code in [10158, 10163, 10167, 10210, 10211] {
            assert!(classify(js_error(code, 503)).is_transient(), "{code}");
        }
        for (code, what) in LASTING_NEWER_CODES {
            assert!(
                matches!(
                    classify(js_error(*code, 400)),
                    PublishError::Refused {
                        reason: DlqReason::Rejected,
                        ..
                    }
                ),
                "{code} {what}"
            );
        }
    }

    #[test]
    fn both_wrong_last_sequence_answers_are_conflicts() {
        for code in [10071, 10164] {
            let e = js_error(code, 400);
            assert!(is_wrong_last_sequence(&e), "{code}");
        }
        assert!(!is_wrong_last_sequence(&js_error(10077, 400)));
        let plain = std::io::Error::other("no server");
        assert!(!is_wrong_last_sequence(&plain));
    }

    #[test]
    fn limits_and_sizes_are_lasting() {
        assert!(matches!(
            classify(js_error(10077, 503)),
            PublishError::Refused {
                reason: DlqReason::Rejected,
                ..
            }
        ));
        assert!(matches!(
            classify(js_error(10054, 400)),
            PublishError::Refused {
                reason: DlqReason::TooLarge,
                ..
            }
        ));
        let subject = jetstream::context::PublishError::with_source(
            PublishErrorKind::Other,
            async_nats::SubjectError::InvalidFormat,
        );
        assert!(!classify(subject).is_transient());
    }

    #[test]
    fn a_full_stream_is_its_own_lasting_reason() {
        for words in [
            "maximum messages exceeded",
            "maximum bytes exceeded",
            "maximum messages per subject exceeded",
        ] {
            assert!(
                matches!(
                    classify(js_error_saying(10077, 503, words)),
                    PublishError::Refused {
                        reason: DlqReason::Full,
                        ..
                    }
                ),
                "{words}"
            );
        }
        // The server's storage, not the stream's limits: the event waits on the spool.
        assert!(classify(js_error_saying(10023, 503, "insufficient resources")).is_transient());
        assert!(
            classify(js_error_saying(
                10077,
                503,
                "resource limits exceeded for account"
            ))
            .is_transient()
        );
    }

    #[test]
    fn no_responders_is_only_provisionally_no_stream() {
        let e = jetstream::context::PublishError::new(PublishErrorKind::StreamNotFound);
        assert!(matches!(
            classify(e),
            PublishError::Refused {
                reason: DlqReason::NoStream,
                ..
            }
        ));
    }

    #[test]
    fn stream_names_replies_parse() {
        let empty: NamesReply = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.api.v1.stream_names_response","total":0,"offset":0,"limit":1024,"streams":null}"#,
        )
        .unwrap();
        assert!(empty.error.is_none() && empty.total == 0 && empty.streams.is_none());
        let err: NamesReply = serde_json::from_str(
            r#"{"type":"x","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
        )
        .unwrap();
        assert_eq!(err.error.map(|e| e.err_code), Some(10008));
    }
}
