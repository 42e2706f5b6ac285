//! W3C Trace Context: the `traceparent` a request may bring and each message carries, and the
//! ids of new spans.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// A trace id (16 bytes, not all zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TraceId(pub(crate) [u8; 16]);

/// A span id (8 bytes, not all zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SpanId(pub(crate) [u8; 8]);

/// Where a span sits: its trace, itself, and whether the trace is sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpanContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The span.
    pub span_id: SpanId,
    /// The `sampled` flag.
    pub sampled: bool,
    /// The vendors' `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

impl TraceId {
    /// Lower-case hex, as `traceparent` and OTLP/JSON write it.
    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A new random id.
    pub(crate) fn random() -> Self {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&nonzero().to_be_bytes());
        b[8..].copy_from_slice(&next().to_be_bytes());
        Self(b)
    }

    /// The id's last 8 bytes as a number: what ratio sampling compares (as OpenTelemetry's
    /// `TraceIdRatioBased` does), so every replica decides the same for one trace.
    pub(crate) fn low(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[8..]);
        u64::from_be_bytes(b)
    }
}

impl SpanId {
    /// Lower-case hex.
    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A new random id.
    pub(crate) fn random() -> Self {
        Self(nonzero().to_be_bytes())
    }
}

impl SpanContext {
    /// `00-<trace id>-<span id>-<flags>`.
    pub(crate) fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id.hex(),
            self.span_id.hex(),
            if self.sampled { "01" } else { "00" }
        )
    }

    /// Parses a `traceparent` (and its `tracestate`): version `00` exactly as the spec writes
    /// it, or a later version's first four fields; `None` for anything malformed (the request
    /// then starts a new trace, as the spec says).
    pub(crate) fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let t = traceparent.trim();
        let mut parts = t.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let rest = parts.next();
        let lower_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(span, &mut span_id).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            sampled: flags & 1 == 1,
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 512)
                .map(str::to_string),
        })
    }
}

thread_local! {
    /// splitmix64 state, seeded once per thread from the operating system's randomness (the
    /// standard library's `RandomState`): ids only need to be unique, and this is cheap.
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

fn next() -> u64 {
    STATE.with(|s| {
        let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn nonzero() -> u64 {
    loop {
        let n = next();
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_the_spec_says() {
        let c = SpanContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("congo=t61rcWkgMzE"),
        )
        .unwrap();
        assert!(c.sampled);
        assert_eq!(c.trace_id.hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.span_id.hex(), "b7ad6b7169203331");
        assert_eq!(
            c.traceparent(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(c.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(SpanContext::parse(bad, None).is_none(), "{bad}");
        }
        // A later version's first fields are read.
        assert!(
            SpanContext::parse(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x",
                None
            )
            .is_some_and(|c| !c.sampled)
        );
    }

    #[test]
    fn new_ids_differ() {
        let ids: std::collections::HashSet<[u8; 16]> =
            (0..1000).map(|_| TraceId::random().0).collect();
        assert_eq!(ids.len(), 1000);
        assert_ne!(SpanId::random(), SpanId::random());
    }
}
