//! The spool on a real directory: append, read back in order, commit, restart, torn writes,
//! full spool, segment rolling, group commit, the directory lock.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::test_support::event;
use super::*;

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_path_buf(),
        ..SpoolSettings::default()
    }
}

async fn open(s: &SpoolSettings) -> Spool {
    Spool::open(s, 1024, Arc::new(Metrics::new()))
        .await
        .unwrap()
}

fn records(range: std::ops::Range<usize>) -> Vec<Record> {
    range.map(|i| event(i).record).collect()
}

/// Reads and commits everything; the records in order.
async fn drain_all(spool: &Spool) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let batch = spool.read_batch(7).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        for item in &batch.items {
            match item {
                Item::Record(s) => out.push(s.record.clone()),
                Item::Undecodable { error, .. } => panic!("{error}"),
            }
        }
        spool.commit(&batch, batch.items.len()).await.unwrap();
    }
}

fn segment_files(dir: &Path) -> Vec<u64> {
    segment::list(dir).unwrap()
}

#[tokio::test]
async fn appends_come_back_in_order_and_commit_empties_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(&settings(dir.path())).await;
    assert!(spool.is_empty());
    spool.append(&records(0..3)).await.unwrap();
    spool.append(&records(3..10)).await.unwrap();
    assert_eq!(spool.events(), 10);
    assert!(spool.disk_bytes() > 0);
    assert_eq!(drain_all(&spool).await, records(0..10));
    assert!(spool.is_empty());
    assert_eq!(spool.read_batch(10).await.unwrap().items.len(), 0);
    // Idle: the drained segment is replaced by an empty one.
    spool.roll_if_idle().await;
    spool.close().await;
    assert_eq!(spool.disk_bytes(), 0);
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_restart_resumes_where_the_drainer_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let spool = open(&s).await;
    spool.append(&records(0..10)).await.unwrap();
    let batch = spool.read_batch(4).await.unwrap();
    assert_eq!(batch.items.len(), 4);
    // Only the first three were acknowledged.
    spool.commit(&batch, 3).await.unwrap();
    assert_eq!(spool.events(), 7);
    spool.close().await;
    drop(spool);

    let spool = open(&s).await;
    assert_eq!(spool.events(), 7);
    spool.append(&records(10..12)).await.unwrap();
    assert_eq!(drain_all(&spool).await, records(3..12));
    spool.close().await;
    drop(spool);

    // Everything drained: a restart finds nothing and keeps no old segment.
    let spool = open(&s).await;
    assert!(spool.is_empty());
    assert_eq!(spool.disk_bytes(), 0);
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_torn_last_record_is_skipped_and_the_rest_survives() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let spool = open(&s).await;
    spool.append(&records(0..3)).await.unwrap();
    spool.close().await;
    drop(spool);
    // A crash in the middle of writing record 3: half a frame at the end of the segment.
    let seg = *segment_files(dir.path()).last().unwrap();
    let frame = record::encode(&event(3));
    let mut f = OpenOptions::new()
        .append(true)
        .open(segment::path(dir.path(), seg))
        .unwrap();
    f.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(f);

    let spool = open(&s).await;
    assert_eq!(spool.events(), 3);
    spool.append(&records(4..6)).await.unwrap();
    let got = drain_all(&spool).await;
    assert_eq!(got, [records(0..3), records(4..6)].concat());
    spool.close().await;
}

#[tokio::test]
async fn a_garbage_tail_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let spool = open(&s).await;
    spool.append(&records(0..2)).await.unwrap();
    spool.close().await;
    drop(spool);
    let seg = *segment_files(dir.path()).last().unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(segment::path(dir.path(), seg))
        .unwrap();
    f.write_all(b"PBsp\x10\0\0\0garbage that is not a frame")
        .unwrap();
    drop(f);
    let spool = open(&s).await;
    assert_eq!(spool.events(), 2);
    assert_eq!(drain_all(&spool).await, records(0..2));
    spool.close().await;
}

#[tokio::test]
async fn a_full_spool_refuses_the_whole_append_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let one = record::encode(&event(0)).len() as u64;
    let s = SpoolSettings {
        max_bytes: one * 5 + one / 2,
        ..settings(dir.path())
    };
    let spool = Spool::open(&s, one, Arc::new(Metrics::new()))
        .await
        .unwrap();
    spool.append(&records(0..4)).await.unwrap();
    assert!(spool.has_room());
    let before = spool.disk_bytes();
    let err = spool.append(&records(4..6)).await.unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(spool.disk_bytes(), before);
    assert_eq!(spool.events(), 4);
    // One more record still fits; then the spool has no room for another.
    spool.append(&records(4..5)).await.unwrap();
    assert!(!spool.has_room());
    assert_eq!(drain_all(&spool).await, records(0..5));
    spool.close().await;
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|&id| {
            std::fs::metadata(segment::path(dir.path(), id))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(on_disk, one * 5, "no half-written append on disk");
}

#[tokio::test]
async fn segments_roll_and_are_deleted_once_drained() {
    let dir = tempfile::tempdir().unwrap();
    let one = record::encode(&event(0)).len() as u64;
    let s = SpoolSettings {
        segment_bytes: one * 3,
        ..settings(dir.path())
    };
    let spool = open(&s).await;
    for i in 0..10 {
        spool.append(&records(i * 2..i * 2 + 2)).await.unwrap();
    }
    assert!(segment_files(dir.path()).len() >= 5);
    let all: u64 = (0..20)
        .map(|i| record::encode(&event(i)).len() as u64)
        .sum();
    assert_eq!(spool.disk_bytes(), all);
    // A batch ends at a segment's end.
    let batch = spool.read_batch(10).await.unwrap();
    let n = batch.items.len();
    assert!((2..10).contains(&n), "{n}");
    spool.commit(&batch, n).await.unwrap();
    spool.close().await;
    drop(spool);
    let spool = open(&s).await;
    assert_eq!(spool.events(), 20 - n as u64);
    assert_eq!(drain_all(&spool).await, records(n..20));
    spool.roll_if_idle().await;
    spool.close().await;
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(spool.disk_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(open(&settings(dir.path())).await);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.append(&records(i * 3..i * 3 + 3)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(spool.events(), 600);
    let mut got = drain_all(&spool).await;
    assert_eq!(got.len(), 600);
    // Each webhook's records stay together and in order.
    let ids: Vec<String> = got.drain(..).map(|r| r.message().msg_id.clone()).collect();
    for chunk in ids.chunks(3) {
        let n: usize = chunk[0].trim_start_matches("id-").parse().unwrap();
        assert_eq!(n % 3, 0);
        assert_eq!(chunk, [0, 1, 2].map(|k| format!("id-{}", n + k)));
    }
    spool.close().await;
}

#[tokio::test]
async fn one_process_per_spool_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let spool = open(&s).await;
    let err = Spool::open(&s, 1024, Arc::new(Metrics::new()))
        .await
        .err()
        .expect("second open refused");
    assert!(matches!(err, SpoolError::Locked(_)), "{err}");
    spool.close().await;
}

#[tokio::test]
async fn undecodable_frames_are_handed_out_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut buf = record::encode(&event(0));
    record::frame_into(&mut buf, b"\x09future format");
    buf.extend_from_slice(&record::encode(&event(1)));
    std::fs::write(segment::path(dir.path(), 1), &buf).unwrap();
    let spool = open(&s).await;
    assert_eq!(spool.events(), 3);
    let batch = spool.read_batch(10).await.unwrap();
    assert!(matches!(&batch.items[0], Item::Record(r) if r == &event(0)));
    assert!(
        matches!(&batch.items[1], Item::Undecodable { payload, .. } if payload == b"\x09future format")
    );
    assert!(matches!(&batch.items[2], Item::Record(r) if r == &event(1)));
    spool.close().await;
}

#[tokio::test]
async fn metrics_follow_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(&settings(dir.path()), 1024, metrics.clone())
        .await
        .unwrap();
    spool.append(&records(0..4)).await.unwrap();
    let text = metrics.encode();
    assert!(text.contains("pusher_bridge_spool_events 4"), "{text}");
    assert!(
        text.contains("pusher_bridge_spool_written_total 4"),
        "{text}"
    );
    assert!(!text.contains("pusher_bridge_spool_bytes 0\n"), "{text}");
    let batch = spool.read_batch(3).await.unwrap();
    spool.commit(&batch, 3).await.unwrap();
    let text = metrics.encode();
    assert!(text.contains("pusher_bridge_spool_events 1"), "{text}");
    assert!(
        text.contains("pusher_bridge_spool_drained_total 3"),
        "{text}"
    );
    spool.close().await;
}

#[tokio::test]
async fn damage_found_while_draining_skips_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(&settings(dir.path())).await;
    spool.append(&records(0..3)).await.unwrap();
    spool.append(&records(3..4)).await.unwrap();
    // The disk corrupts record 2 after it was written (bit rot).
    let seg = *segment_files(dir.path()).last().unwrap();
    let path = segment::path(dir.path(), seg);
    let mut bytes = std::fs::read(&path).unwrap();
    let at: usize = (0..2)
        .map(|i| record::encode(&event(i)).len())
        .sum::<usize>()
        + 20;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(spool.events(), 4);
    let got = drain_all(&spool).await;
    assert_eq!(got, [records(0..2), records(3..4)].concat());
    assert!(spool.is_empty(), "{} left", spool.events());
    spool.close().await;
}

#[tokio::test]
async fn a_writer_that_panicked_is_said_and_refuses_every_append() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(open(&settings(dir.path())).await);
    spool.append(&records(0..2)).await.unwrap();
    assert_eq!(spool.writer_stopped(), None);
    // What the bridge stops on (`crate::run`).
    let lost = tokio::spawn({
        let spool = spool.clone();
        async move { spool.writer_lost().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(!lost.is_finished());
    spool.panic_writer().await;
    let e = tokio::time::timeout(std::time::Duration::from_secs(1), lost)
        .await
        .expect("the bridge is told at once")
        .unwrap();
    assert!(
        matches!(&e, SpoolError::WriterPanicked(p) if p == "a test asked the spool writer to panic"),
        "{e}"
    );
    assert_eq!(
        spool.writer_stopped().as_deref(),
        Some("a test asked the spool writer to panic")
    );
    assert!(spool.append(&records(2..3)).await.is_err());
    assert!(!spool.has_room());
    // What was committed before is still read.
    assert_eq!(drain_all(&spool).await, records(0..2));
}
