//! What one spool record holds and how it is laid out on disk.
//!
//! A *frame* is `magic (4) | payload length (u32 LE) | CRC32 of length and payload (u32 LE) |
//! payload`. The magic lets a reader find the next frame after damaged bytes; the length bounds
//! the read; the CRC proves the whole frame was written (a crash mid-write leaves a frame whose
//! checksum does not match, which the reader skips).
//!
//! The payload is a version byte, a kind byte, the unix ms the record was spooled at, then the
//! [`Message`] fields as length-prefixed strings, and for dead letters the reason, detail,
//! attempts and first failure time: everything needed to publish it again; version 2 adds the
//! message's trace context at the end.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::message::{DeadLetter, DlqReason, Message};

/// First bytes of every frame.
pub(crate) const MAGIC: [u8; 4] = *b"PBsp";
/// Bytes before the payload: magic, length, CRC.
pub(crate) const HEADER_LEN: usize = 12;
/// Largest payload a reader accepts; a larger length field is damage, not a record.
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;
/// Payload format version of a record without a trace context: what every version reads.
const VERSION: u8 = 1;
/// Version 1 plus, at the end, the message's `traceparent` and `tracestate` (empty: none).
/// Written only for a message that carries a trace context (`[tracing]` on), so a spool
/// written with tracing off stays readable by a bridge that predates tracing.
const VERSION_TRACED: u8 = 2;
const KIND_EVENT: u8 = 1;
const KIND_DEAD_LETTER: u8 = 2;

/// What a spool record republishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An event for its subject (`broker.publish`).
    Event(Message),
    /// A dead letter for the dead-letter stream / queue (`broker.publish_dead_letter`).
    DeadLetter(DeadLetter),
}

impl Record {
    /// The event inside, whichever kind.
    pub fn message(&self) -> &Message {
        match self {
            Record::Event(m) => m,
            Record::DeadLetter(d) => &d.message,
        }
    }
}

/// A record and when it was spooled (for `spool_oldest_age_seconds`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    /// Unix ms when the record was written.
    pub spooled_at_ms: u64,
    /// The record.
    pub record: Record,
}

/// A payload whose checksum matched but which this version cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable spool record: {0}")]
pub struct DecodeError(pub &'static str);

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Fields are bounded by the webhook body limit, far below 4 GiB.
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Appends the frame of `record` (spooled at `spooled_at_ms`) to `out`; returns its length.
pub(crate) fn encode_into(out: &mut Vec<u8>, spooled_at_ms: u64, record: &Record) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]); // length and CRC, filled in by `seal`
    let (kind, m) = match record {
        Record::Event(m) => (KIND_EVENT, m),
        Record::DeadLetter(d) => (KIND_DEAD_LETTER, &d.message),
    };
    out.push(if m.trace.is_some() {
        VERSION_TRACED
    } else {
        VERSION
    });
    out.push(kind);
    out.extend_from_slice(&spooled_at_ms.to_le_bytes());
    put_bytes(out, m.subject.as_bytes());
    put_bytes(out, m.msg_id.as_bytes());
    put_bytes(out, &m.body);
    put_bytes(out, m.app_id.as_bytes());
    put_bytes(out, m.event.as_bytes());
    put_bytes(out, m.channel.as_bytes());
    put_bytes(out, m.time_ms.as_bytes());
    if let Record::DeadLetter(d) = record {
        put_bytes(out, d.reason.as_str().as_bytes());
        put_bytes(out, d.detail.as_bytes());
        out.extend_from_slice(&d.attempts.to_le_bytes());
        out.extend_from_slice(&d.first_failure_ms.to_le_bytes());
    }
    if let Some(trace) = &m.trace {
        put_bytes(out, trace.traceparent.as_bytes());
        put_bytes(out, trace.tracestate.as_deref().unwrap_or("").as_bytes());
    }
    seal(out, start);
    out.len() - start
}

/// Fills in length and CRC of the frame that starts at `start` and runs to the end of `out`.
fn seal(out: &mut [u8], start: usize) {
    let payload_start = start + HEADER_LEN;
    let len = ((out.len() - payload_start) as u32).to_le_bytes();
    let sum = crc(&len, &out[payload_start..]).to_le_bytes();
    out[start + 4..start + 8].copy_from_slice(&len);
    out[start + 8..start + 12].copy_from_slice(&sum);
}

/// Appends a frame around an arbitrary `payload` (used to keep undecodable records aside).
pub(crate) fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(payload);
    seal(out, start);
}

/// The frame of one record, as a new buffer.
pub fn encode(spooled: &Spooled) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, spooled.spooled_at_ms, &spooled.record);
    out
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("payload ends early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| DecodeError("field is not UTF-8"))
    }
}

/// Decodes a payload whose frame checksum matched.
pub fn decode(payload: &[u8]) -> Result<Spooled, DecodeError> {
    let mut c = Cursor { buf: payload };
    let version = c.u8()?;
    if version != VERSION && version != VERSION_TRACED {
        return Err(DecodeError("unknown version"));
    }
    let kind = c.u8()?;
    let spooled_at_ms = c.u64()?;
    let message = Message {
        subject: c.string()?,
        msg_id: c.string()?,
        body: Bytes::copy_from_slice(c.bytes()?),
        app_id: Arc::from(c.string()?),
        event: c.string()?,
        channel: c.string()?,
        time_ms: c.string()?,
        trace: None,
    };
    let record = match kind {
        KIND_EVENT => Record::Event(message),
        KIND_DEAD_LETTER => {
            let reason =
                DlqReason::parse(&c.string()?).ok_or(DecodeError("unknown dead-letter reason"))?;
            Record::DeadLetter(DeadLetter {
                message,
                reason,
                detail: c.string()?,
                attempts: c.u32()?,
                first_failure_ms: c.u64()?,
            })
        }
        _ => return Err(DecodeError("unknown record kind")),
    };
    let mut record = record;
    if version == VERSION_TRACED {
        let traceparent = c.string()?;
        let tracestate = Some(c.string()?).filter(|s| !s.is_empty());
        let trace = Some(Box::new(crate::message::TraceContext {
            traceparent,
            tracestate,
        }));
        match &mut record {
            Record::Event(m) => m.trace = trace,
            Record::DeadLetter(d) => d.message.trace = trace,
        }
    }
    if !c.buf.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(Spooled {
        spooled_at_ms,
        record,
    })
}

/// What [`parse_at`] found at one position.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame with a matching checksum: its payload and where the next frame starts.
    Frame {
        /// Payload bytes within the buffer.
        payload: Range<usize>,
        /// Offset just past the frame.
        next: usize,
    },
    /// The buffer ends inside the frame; `total` is the frame's length when the header is whole.
    Incomplete {
        /// Header + payload length, if the header could be read.
        total: Option<usize>,
    },
    /// No frame starts here (wrong magic, impossible length, checksum mismatch).
    Corrupt,
}

/// Tries to read one frame starting at `pos` of `buf`.
pub fn parse_at(buf: &[u8], pos: usize) -> Parsed {
    let rest = buf.get(pos..).unwrap_or(&[]);
    let magic_len = rest.len().min(MAGIC.len());
    if rest[..magic_len] != MAGIC[..magic_len] {
        return Parsed::Corrupt;
    }
    if rest.len() < HEADER_LEN {
        return Parsed::Incomplete { total: None };
    }
    let len_bytes = &rest[4..8];
    let mut b = [0; 4];
    b.copy_from_slice(len_bytes);
    let len = u32::from_le_bytes(b) as usize;
    if len > MAX_PAYLOAD {
        return Parsed::Corrupt;
    }
    let total = HEADER_LEN + len;
    if rest.len() < total {
        return Parsed::Incomplete { total: Some(total) };
    }
    b.copy_from_slice(&rest[8..12]);
    let payload = &rest[HEADER_LEN..total];
    if crc(len_bytes, payload) != u32::from_le_bytes(b) {
        return Parsed::Corrupt;
    }
    Parsed::Frame {
        payload: pos + HEADER_LEN..pos + total,
        next: pos + total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::test_support::event;

    fn dead_letter() -> Spooled {
        let Record::Event(message) = event(7).record else {
            unreachable!()
        };
        Spooled {
            spooled_at_ms: 5,
            record: Record::DeadLetter(DeadLetter {
                message,
                reason: DlqReason::NoStream,
                detail: "no stream matches subject ✓".into(),
                attempts: 3,
                first_failure_ms: 1_700_000_000_001,
            }),
        }
    }

    #[test]
    fn events_and_dead_letters_round_trip() {
        for s in [event(1), dead_letter()] {
            let frame = encode(&s);
            let Parsed::Frame { payload, next } = parse_at(&frame, 0) else {
                panic!("not a frame")
            };
            assert_eq!(next, frame.len());
            assert_eq!(decode(&frame[payload]).unwrap(), s);
        }
    }

    #[test]
    fn trace_contexts_round_trip_and_untraced_records_stay_version_1() {
        let traced = |mut s: Spooled| {
            let m = match &mut s.record {
                Record::Event(m) => m,
                Record::DeadLetter(d) => &mut d.message,
            };
            m.trace = Some(Box::new(crate::message::TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: Some("congo=t61rcWkgMzE".into()),
            }));
            s
        };
        for s in [traced(event(1)), traced(dead_letter())] {
            let frame = encode(&s);
            assert_eq!(frame[HEADER_LEN], VERSION_TRACED);
            let Parsed::Frame { payload, .. } = parse_at(&frame, 0) else {
                panic!("not a frame")
            };
            assert_eq!(decode(&frame[payload]).unwrap(), s);
        }
        // What a bridge that predates tracing wrote, and reads.
        assert_eq!(encode(&event(2))[HEADER_LEN], VERSION);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let frame = encode(&event(3));
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad[byte] ^= 1 << bit;
                match parse_at(&bad, 0) {
                    Parsed::Frame { .. } => panic!("flip of byte {byte} bit {bit} not detected"),
                    Parsed::Corrupt | Parsed::Incomplete { .. } => {}
                }
            }
        }
    }

    #[test]
    fn truncated_frames_are_incomplete() {
        let frame = encode(&event(4));
        assert_eq!(parse_at(&frame[..2], 0), Parsed::Incomplete { total: None });
        assert_eq!(
            parse_at(&frame[..11], 0),
            Parsed::Incomplete { total: None }
        );
        assert_eq!(
            parse_at(&frame[..frame.len() - 1], 0),
            Parsed::Incomplete {
                total: Some(frame.len())
            }
        );
        assert_eq!(
            parse_at(&frame, frame.len()),
            Parsed::Incomplete { total: None }
        );
    }

    #[test]
    fn absurd_lengths_and_wrong_magic_are_corrupt() {
        let mut frame = encode(&event(5));
        frame[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_at(&frame, 0), Parsed::Corrupt);
        assert_eq!(parse_at(b"garbage-garbage-garbage", 0), Parsed::Corrupt);
    }

    #[test]
    fn bad_payloads_are_decode_errors_not_panics() {
        let frame = encode(&dead_letter());
        let payload = &frame[HEADER_LEN..];
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong_version = payload.to_vec();
        wrong_version[0] = 9;
        assert_eq!(decode(&wrong_version), Err(DecodeError("unknown version")));
        let mut wrong_kind = payload.to_vec();
        wrong_kind[1] = 9;
        assert_eq!(decode(&wrong_kind), Err(DecodeError("unknown record kind")));
        let mut trailing = payload.to_vec();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError("trailing bytes")));
    }
}
