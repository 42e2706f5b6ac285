//! A spool whose disk is full, on a real (small) tmpfs: readiness says so while the broker is
//! away and turns green again once the disk has room; the drainer commits its cursor on a
//! full disk. Needs root to mount the tmpfs, as CI runs here; the test fails loudly without.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::StatusCode;
use pusher_bridge::broker::Message;
use pusher_bridge::config::BrokerKind;
use pusher_bridge::spool::Record;

use crate::common::load::{DrainRig, drain_rig, event_message};
use crate::common::{
    TestApp, delete_streams, jetstream_ctx, nats_settings, nats_url, stream_messages, unique,
    unreachable, webhook_body,
};

/// A tmpfs of `size` mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("pb-tmpfs"));
        std::fs::create_dir_all(&dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    /// Fills the file system with `filler` until it refuses (ENOSPC).
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![7u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // The last partial block too.
        while f.write_all(&[7u8]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spool_in(dir: &Path) -> PathBuf {
    dir.join("spool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_the_disk_refuses_the_spool_and_200_once_it_has_room() {
    let fs = Tmpfs::mount("2m");
    let mut s = nats_settings();
    unreachable(BrokerKind::Nats, &mut s);
    s.spool.dir = spool_in(&fs.dir);
    // Far more than the disk holds: only the disk can refuse.
    s.spool.max_bytes = 1 << 30;
    let app = TestApp::spawn(s).await;
    let body = webhook_body(1, &[r#"{"name":"channel_occupied","channel":"c"}"#]);
    assert_eq!(app.post_signed(&body).await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);

    let filler = fs.fill();
    // Larger than what is left of the segment's last page.
    let pad = "x".repeat(64 * 1024);
    let big = webhook_body(
        2,
        &[&format!(
            r#"{{"name":"channel_occupied","channel":"c","pad":"{pad}"}}"#
        )],
    );
    let refused = app.post_signed(&big).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    let ready = app.get("/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    assert!(
        ready.body.contains("the spool's disk refuses writes (")
            && ready.body.contains("No space left on device")
            && ready.body.contains("), and the broker is not up: "),
        "{}",
        ready.body
    );

    // Room again: readiness finds out by itself (a load balancer sends no webhook meanwhile).
    std::fs::remove_file(&filler).expect("filler removed");
    let mut green = false;
    for _ in 0..100 {
        if app.get("/readyz").await.status == StatusCode::OK {
            green = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(green, "readiness stayed red after the disk had room");
    let again = app.post_signed(&body).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert!(again.body.contains(r#""spooled":1"#), "{}", again.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drainer_commits_its_cursor_on_a_full_disk() {
    let fs = Tmpfs::mount("2m");
    let mut s = nats_settings();
    s.spool.dir = spool_in(&fs.dir);
    let DrainRig { spool, drainer, .. } = drain_rig(&s, Duration::from_secs(5)).await;
    let msgs: Vec<Message> = (0..11).map(|i| event_message(&s, i, "full")).collect();
    // A first drain leaves a cursor file behind, as on any spool that ever drained.
    spool
        .append(&[Record::Event(msgs[0].clone())])
        .await
        .unwrap();
    assert_eq!(drainer.drain_once().await.unwrap().published, 1);
    let rest: Vec<Record> = msgs[1..].iter().cloned().map(Record::Event).collect();
    spool.append(&rest).await.unwrap();

    let _filler = fs.fill();
    // Before: every commit failed writing `cursor.tmp`, and the batch was published again.
    let report = drainer.drain_once().await.expect("drained on a full disk");
    assert_eq!(report.published, 10);
    assert!(spool.is_empty());
    let js = jetstream_ctx(&nats_url()).await;
    assert_eq!(
        stream_messages(&js, &s.broker.nats.stream, 11).await.len(),
        11
    );
    delete_streams(&js, &s).await;
}
