//! Unit tests of the embedded broker.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use super::frame::encode_frame;
use super::*;
use crate::broker::Sink;
use crate::config::local::*;

const GUARD: Duration = Duration::from_secs(5);

fn rec(topic: &str, id: Option<&str>, payload: &[u8]) -> OutRecord {
    OutRecord {
        topic: topic.to_owned(),
        key: None,
        headers: id
            .map(|id| vec![(LOCKGATE_ID_HEADER.to_owned(), id.as_bytes().to_vec())])
            .unwrap_or_default(),
        payload: payload.to_vec(),
    }
}

fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.payload.clone()).collect()
}

async fn next(source: &mut LocalSource) -> Delivery {
    tokio::time::timeout(GUARD, source.next())
        .await
        .unwrap()
        .unwrap()
}

#[test]
fn append_and_read_round_trip_keys_headers_and_binary_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let records = vec![
        OutRecord {
            topic: "orders".into(),
            key: Some(vec![0, 255, 1]),
            headers: vec![
                ("a".into(), b"1".to_vec()),
                ("a".into(), vec![]),
                ("bin".into(), vec![0, 0, 7]),
            ],
            payload: (0..=255u8).collect(),
        },
        OutRecord {
            topic: "orders".into(),
            key: Some(vec![]),
            headers: vec![],
            payload: vec![],
        },
        rec("other", None, b"elsewhere"),
        rec("orders", None, b"third"),
    ];
    let offsets = b.append(&records).unwrap();
    assert_eq!(offsets, vec![Some(0), Some(1), Some(0), Some(2)]);
    assert_eq!(b.end_offset("orders").unwrap(), 3);
    assert_eq!(b.end_offset("other").unwrap(), 1);
    assert_eq!(b.end_offset("missing").unwrap(), 0);
    assert!(b.read("missing", 0, 10).unwrap().is_empty());

    let got = b.read("orders", 0, 10).unwrap();
    assert_eq!(got.len(), 3);
    for (i, (got, want)) in got
        .iter()
        .zip([&records[0], &records[1], &records[3]])
        .enumerate()
    {
        assert_eq!(got.topic, "orders");
        assert_eq!(got.partition, Some(0));
        assert_eq!(got.offset, Some(i as u64));
        assert_eq!(got.key, want.key);
        assert_eq!(got.headers, want.headers);
        assert_eq!(got.payload, want.payload);
        assert!(got.timestamp_ms.is_some_and(|t| t > 0));
        assert_eq!(got.reply_to, None);
    }
    let tail = b.read("orders", 1, 1).unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].offset, Some(1));
    assert!(b.read("orders", 3, 10).unwrap().is_empty());
    assert_eq!(b.topics().unwrap(), vec!["orders", "other"]);
}

/// A broker whose topics roll a segment every `segment_bytes`, with these other settings.
fn with_segments(
    dir: &Path,
    segment_bytes: u64,
    f: impl FnOnce(&mut TopicSettings),
) -> LocalBroker {
    let mut defaults = TopicSettings {
        segment_bytes,
        ..TopicSettings::default()
    };
    f(&mut defaults);
    LocalBroker::open(dir)
        .unwrap()
        .with_settings(LocalSettings {
            defaults,
            ..LocalSettings::default()
        })
}

/// A clock the test moves: (the clock for the broker, the handle to move it).
fn test_clock(start: u64) -> (Clock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(start));
    let handle = Arc::clone(&now);
    (Arc::new(move || now.load(Ordering::SeqCst)), handle)
}

/// 100-byte payloads numbered by `i`.
fn numbered(topic: &str, range: std::ops::Range<u64>) -> Vec<OutRecord> {
    range
        .map(|i| {
            let mut p = i.to_string().into_bytes();
            p.resize(100, b'.');
            rec(topic, None, &p)
        })
        .collect()
}

fn number(r: &Record) -> u64 {
    std::str::from_utf8(&r.payload)
        .unwrap()
        .trim_end_matches('.')
        .parse()
        .unwrap()
}

fn segment_bases(dir: &Path, topic: &str) -> Vec<u64> {
    segments::list(&dir.join("topics").join(topic))
        .unwrap()
        .iter()
        .map(|s| s.base)
        .collect()
}

#[tokio::test]
async fn records_are_read_across_segment_boundaries_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    // Frames of 125 bytes, five per append: a segment takes two appends, then rolls.
    let b = with_segments(dir.path(), 1000, |_| {});
    for chunk in (0..100).step_by(5) {
        b.append(&numbered("t", chunk..chunk + 5)).unwrap();
    }
    let bases = segment_bases(dir.path(), "t");
    assert_eq!(bases, (0..100).step_by(10).collect::<Vec<_>>());
    let fresh = LocalBroker::open(dir.path()).unwrap();
    for broker in [&b, &fresh] {
        assert_eq!(broker.end_offset("t").unwrap(), 100);
        for from in 0..100 {
            let got = broker.read("t", from, 3).unwrap();
            let want: Vec<u64> = (from..(from + 3).min(100)).collect();
            assert_eq!(
                got.iter().map(number).collect::<Vec<_>>(),
                want,
                "from {from}"
            );
            assert!(got.iter().zip(&want).all(|(r, w)| r.offset == Some(*w)));
        }
        // Consecutive reads (as `tail` and the DLQ scan do) see every record once.
        let mut next = 0;
        let mut seen = Vec::new();
        loop {
            let batch = broker.read("t", next, 7).unwrap();
            let Some(last) = batch.last() else { break };
            next = last.offset.unwrap() + 1;
            seen.extend(batch.iter().map(number));
        }
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }

    // A group reads across the boundaries, commits inside a later segment and resumes there.
    let mut s = b.source("t", "g").unwrap();
    for i in 0..35u64 {
        let d = next(&mut s).await;
        assert_eq!((d.record.offset, number(&d.record)), (Some(i), i));
        d.ack.ack(AckKind::Done).await.unwrap();
    }
    s.commit().await.unwrap();
    let g = read_group_file(&dir.path().join("topics/t/groups/g"))
        .unwrap()
        .unwrap();
    assert_eq!((g.offset, g.segment), (35, 30));
    drop(s);
    let mut s = fresh
        .source("t", "g")
        .unwrap()
        .with_poll(Duration::from_millis(10));
    for i in 35..100u64 {
        let d = next(&mut s).await;
        assert_eq!(d.record.offset, Some(i));
        d.ack.ack(AckKind::Done).await.unwrap();
    }
    // Committed at the very end of a segment: the position is that segment's end, and a
    // resumed source goes on in the next segment once one exists.
    s.commit().await.unwrap();
    drop(s);
    let mut s = fresh
        .source("t", "g")
        .unwrap()
        .with_poll(Duration::from_millis(10));
    b.append(&numbered("t", 100..105)).unwrap();
    assert_eq!(segment_bases(dir.path(), "t").last(), Some(&100));
    let d = next(&mut s).await;
    assert_eq!((d.record.offset, number(&d.record)), (Some(100), 100));
}

#[tokio::test]
async fn data_and_committed_offsets_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = LocalBroker::open(dir.path()).unwrap();
        b.append(&[
            rec("t", None, b"a"),
            rec("t", None, b"b"),
            rec("t", None, b"c"),
        ])
        .unwrap();
        let mut s = b.source("t", "g").unwrap();
        let d = next(&mut s).await;
        d.ack.ack(AckKind::Done).await.unwrap();
        let d = next(&mut s).await;
        d.ack.ack(AckKind::DeadLettered).await.unwrap();
        s.commit().await.unwrap();
    }
    let b = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(b.end_offset("t").unwrap(), 3);
    assert_eq!(payloads(&b.read("t", 0, 10).unwrap()), [b"a", b"b", b"c"]);
    assert_eq!(b.committed("t", "g").unwrap(), 2);
    let mut s = b.source("t", "g").unwrap();
    let d = next(&mut s).await;
    assert_eq!(d.record.offset, Some(2));
    assert_eq!(d.record.payload, b"c");
    // Appending after a reopen continues the offsets.
    assert_eq!(b.append(&[rec("t", None, b"d")]).unwrap(), [Some(3)]);
}

#[tokio::test]
async fn a_torn_tail_is_invisible_and_truncated_by_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    b.append(&[rec("t", None, b"zero"), rec("t", None, b"one")])
        .unwrap();
    let log = dir
        .path()
        .join("topics/t/segments/00000000000000000000.log");
    let good_len = fs::metadata(&log).unwrap().len();
    let mut s = b
        .source("t", "g")
        .unwrap()
        .with_poll(Duration::from_millis(10));
    next(&mut s).await;
    next(&mut s).await;

    let torn_tails: Vec<Vec<u8>> = vec![
        // Half a frame: a crash in the middle of write(2).
        {
            let f = encode_frame(1, &rec("t", None, b"lost")).unwrap();
            f[..f.len() / 2].to_vec()
        },
        // A complete frame whose body does not match its crc.
        {
            let mut f = encode_frame(1, &rec("t", None, b"lost")).unwrap();
            let last = f.len() - 1;
            f[last] ^= 0xff;
            f
        },
        // Three bytes: not even a length.
        vec![1, 2, 3],
        // A huge garbage length.
        vec![0xff; 40],
    ];
    let mut expected_end = good_len;
    for (i, tail) in torn_tails.iter().enumerate() {
        let before = fs::metadata(&log).unwrap().len();
        assert_eq!(before, expected_end);
        OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(tail)
            .unwrap();
        let fresh = LocalBroker::open(dir.path()).unwrap();
        let n = 2 + i as u64;
        assert_eq!(fresh.end_offset("t").unwrap(), n, "tail {i}");
        assert_eq!(fresh.read("t", 0, 100).unwrap().len() as u64, n, "tail {i}");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.next())
                .await
                .is_err(),
            "a reader must not deliver torn tail {i}"
        );

        let payload = format!("after {i}");
        let appended = b.append(&[rec("t", None, payload.as_bytes())]).unwrap();
        assert_eq!(appended, [Some(n)], "tail {i}");
        let frame = encode_frame(0, &rec("t", None, payload.as_bytes())).unwrap();
        expected_end = before + frame.len() as u64;
        assert_eq!(fs::metadata(&log).unwrap().len(), expected_end, "tail {i}");
        let d = next(&mut s).await;
        assert_eq!(d.record.offset, Some(n));
        assert_eq!(d.record.payload, payload.as_bytes());
    }
    let all = b.read("t", 0, 100).unwrap();
    assert_eq!(all.len(), 6);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, r)| r.offset == Some(i as u64))
    );
}

#[test]
fn duplicates_by_lockgate_id_are_stored_once_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let one = LocalBroker::open(dir.path()).unwrap();
    let two = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(one.append(&[rec("t", Some("a"), b"a")]).unwrap(), [Some(0)]);
    assert_eq!(
        one.append(&[rec("t", Some("a"), b"a again")]).unwrap(),
        [None]
    );
    // `two` never saw `a` in memory: it must learn it from the log under the lock.
    assert_eq!(
        two.append(&[rec("t", Some("a"), b"a"), rec("t", Some("b"), b"b")])
            .unwrap(),
        [None, Some(1)]
    );
    // Duplicates inside one batch, records without an id, and the same id on another topic.
    assert_eq!(
        one.append(&[
            rec("t", Some("b"), b"b"),
            rec("t", Some("c"), b"c"),
            rec("t", Some("c"), b"c"),
            rec("t", None, b"no id"),
            rec("t", None, b"no id"),
            rec("u", Some("a"), b"a on u"),
        ])
        .unwrap(),
        [None, Some(2), None, Some(3), Some(4), Some(0)]
    );
    let fresh = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(
        payloads(&fresh.read("t", 0, 100).unwrap()),
        [&b"a"[..], b"b", b"c", b"no id", b"no id"]
    );
    assert_eq!(fresh.append(&[rec("t", Some("c"), b"c")]).unwrap(), [None]);
}

#[tokio::test]
async fn sink_publishes_and_deduplicates() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let sink = b.sink();
    sink.publish(vec![
        rec("out", Some("x"), b"1"),
        rec("out", Some("y"), b"2"),
    ])
    .await
    .unwrap();
    sink.publish(vec![rec("out", Some("x"), b"1")])
        .await
        .unwrap();
    assert_eq!(payloads(&b.read("out", 0, 10).unwrap()), [b"1", b"2"]);
    assert!(matches!(
        sink.publish(vec![rec("bad/name", None, b"")]).await,
        Err(BrokerError::Invalid(_))
    ));
}

#[tokio::test]
async fn source_commits_the_contiguous_prefix_of_acks() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let records: Vec<_> = (0..6).map(|i| rec("t", None, &[i])).collect();
    b.append(&records).unwrap();
    let mut s = b.source("t", "g").unwrap();
    assert_eq!(s.describe(), "local topic t, group g");
    let mut deliveries = Vec::new();
    for i in 0..4u8 {
        let d = next(&mut s).await;
        assert_eq!(d.record.offset, Some(u64::from(i)));
        assert_eq!(d.record.payload, [i]);
        deliveries.push(Some(d));
    }
    for i in [0, 2, 3] {
        let d = deliveries[i].take().unwrap();
        d.ack.ack(AckKind::Done).await.unwrap();
    }
    s.commit().await.unwrap();
    assert_eq!(b.committed("t", "g").unwrap(), 1);
    {
        let mut again = b.source("t", "g").unwrap();
        assert_eq!(next(&mut again).await.record.offset, Some(1));
    }
    let d = deliveries[1].take().unwrap();
    d.ack.ack(AckKind::Done).await.unwrap();
    s.commit().await.unwrap();
    assert_eq!(b.committed("t", "g").unwrap(), 4);

    // Resumes at the committed offset, from the stored byte position.
    let mut resumed = b.source("t", "g").unwrap();
    let d = next(&mut resumed).await;
    assert_eq!((d.record.offset, d.record.payload), (Some(4), vec![4]));
    let mut other = b.source("t", "other").unwrap();
    assert_eq!(next(&mut other).await.record.offset, Some(0));
    assert_eq!(b.committed("t", "other").unwrap(), 0);
}

#[tokio::test]
async fn acks_are_committed_in_the_background_while_next_waits() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    b.append(&[rec("t", None, b"a"), rec("t", None, b"b")])
        .unwrap();
    let mut s = b.source("t", "g").unwrap();
    let first = next(&mut s).await;
    let second = next(&mut s).await;
    let acker = tokio::spawn(async move {
        first.ack.ack(AckKind::Done).await.unwrap();
        second.ack.ack(AckKind::Done).await.unwrap();
    });
    // `next` is blocked at the end of the topic while the acks arrive.
    let waiting = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
    assert!(waiting.is_err(), "nothing more to deliver");
    acker.await.unwrap();
    tokio::time::timeout(GUARD, async {
        while b.committed("t", "g").unwrap() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_source_wakes_up_for_an_in_process_append() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    // Polling effectively off: only the in-process notification can wake the source.
    let mut s = b
        .source("t", "g")
        .unwrap()
        .with_poll(Duration::from_secs(3600));
    let sink = b.sink();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sink.publish(vec![rec("t", None, b"hello")]).await.unwrap();
    });
    let d = next(&mut s).await;
    assert_eq!(d.record.payload, b"hello");
    producer.await.unwrap();
}

#[tokio::test]
async fn a_waiting_source_sees_appends_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let mut s = b.source("t", "g").unwrap();
    let other_dir = dir.path().to_owned();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Another instance shares no Notify with `b`: only polling finds this record.
        let other = LocalBroker::open(&other_dir).unwrap();
        other
            .sink()
            .publish(vec![rec("t", None, b"from afar")])
            .await
            .unwrap();
    });
    let d = next(&mut s).await;
    assert_eq!(d.record.payload, b"from afar");
    producer.await.unwrap();
}

#[test]
fn invalid_topic_and_group_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let long = "x".repeat(250);
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../escape",
        "sp ace",
        "é",
        long.as_str(),
    ] {
        let err = b.append(&[rec(bad, None, b"")]).unwrap_err();
        match err {
            BrokerError::Invalid(msg) => {
                assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.read(bad, 0, 1), Err(BrokerError::Invalid(_))));
        assert!(matches!(b.source(bad, "g"), Err(BrokerError::Invalid(_))));
        assert!(matches!(b.source("t", bad), Err(BrokerError::Invalid(_))));
        assert!(matches!(
            b.committed("t", bad),
            Err(BrokerError::Invalid(_))
        ));
    }
    // A batch with one bad topic writes nothing.
    assert!(
        b.append(&[rec("ok", None, b""), rec("no/", None, b"")])
            .is_err()
    );
    assert_eq!(b.end_offset("ok").unwrap(), 0);
    for good in ["a", "A.b_c-9", "x".repeat(249).as_str(), "..."] {
        assert_eq!(b.append(&[rec(good, None, b"")]).unwrap(), [Some(0)]);
    }
}

#[test]
fn concurrent_appenders_store_every_record_once_with_unique_offsets() {
    const THREADS: u64 = 8;
    const BATCHES: u64 = 40;
    const PER_BATCH: u64 = 10;
    let total = THREADS * BATCHES * PER_BATCH;
    let dir = tempfile::tempdir().unwrap();
    // Segments of about three appends: rolls race with appends of other instances too.
    let open = |dir: &Path| with_segments(dir, 50_000, |_| {});
    let shared = open(dir.path());
    let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            // Half the threads share an instance (in-process mutex), half have their own
            // (the file lock is all that separates them, as between processes).
            let b = if t % 2 == 0 {
                shared.clone()
            } else {
                open(dir.path())
            };
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let mut offsets = Vec::new();
                for batch in 0..BATCHES {
                    let records: Vec<_> = (0..PER_BATCH)
                        .map(|i| {
                            let id = format!("{t}-{batch}-{i}");
                            let mut payload = id.clone().into_bytes();
                            payload.resize(2000, b'.');
                            rec("t", Some(&id), &payload)
                        })
                        .collect();
                    offsets.extend(b.append(&records).unwrap());
                }
                offsets
            })
        })
        .collect();
    let mut offsets: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .map(Option::unwrap)
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..total).collect::<Vec<_>>());
    let all = LocalBroker::open(dir.path())
        .unwrap()
        .read("t", 0, usize::MAX)
        .unwrap();
    assert_eq!(all.len() as u64, total);
    let ids: HashSet<_> = all.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(ids.len() as u64, total);
    assert!(segment_bases(dir.path(), "t").len() > 50);
    // A record in every segment is where its offset says, seen from a fresh instance.
    let fresh = LocalBroker::open(dir.path()).unwrap();
    for base in segment_bases(dir.path(), "t") {
        assert_eq!(fresh.read("t", base, 1).unwrap()[0], all[base as usize]);
    }
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, r)| r.offset == Some(i as u64))
    );
}

#[test]
fn the_duplicate_window_keeps_at_most_its_count_of_ids_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_segments(dir.path(), DEFAULT_SEGMENT_BYTES, |s| {
        s.duplicate_window_ids = 3;
    });
    for id in ["a", "b", "c", "d"] {
        assert!(b.append(&[rec("t", Some(id), id.as_bytes())]).unwrap()[0].is_some());
    }
    // The window holds b, c, d: a left it and is stored again (and pushes b out).
    assert_eq!(b.append(&[rec("t", Some("b"), b"b")]).unwrap(), [None]);
    assert_eq!(b.append(&[rec("t", Some("a"), b"a")]).unwrap(), [Some(4)]);
    let reopened = with_segments(dir.path(), DEFAULT_SEGMENT_BYTES, |s| {
        s.duplicate_window_ids = 3;
    });
    assert_eq!(
        reopened
            .append(&[
                rec("t", Some("c"), b"c"),
                rec("t", Some("d"), b"d"),
                rec("t", Some("a"), b"a"),
                rec("t", Some("b"), b"b"),
            ])
            .unwrap(),
        [None, None, None, Some(5)]
    );
}

#[test]
fn the_duplicate_window_forgets_ids_older_than_its_time_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, now) = test_clock(1_000_000);
    let open = || {
        with_segments(dir.path(), DEFAULT_SEGMENT_BYTES, |s| {
            s.duplicate_window = Duration::from_millis(1000);
        })
        .with_clock(Arc::clone(&clock))
    };
    let b = open();
    assert_eq!(b.append(&[rec("t", Some("a"), b"1")]).unwrap(), [Some(0)]);
    now.store(1_001_000, Ordering::SeqCst);
    assert_eq!(
        b.append(&[rec("t", Some("a"), b"2")]).unwrap(),
        [None],
        "at the edge"
    );
    now.store(1_001_001, Ordering::SeqCst);
    assert_eq!(
        b.append(&[rec("t", Some("a"), b"3")]).unwrap(),
        [Some(1)],
        "left the window"
    );
    // Another instance learns the window (with the times) from the dedup file.
    now.store(1_001_500, Ordering::SeqCst);
    assert_eq!(open().append(&[rec("t", Some("a"), b"4")]).unwrap(), [None]);
    now.store(1_002_002, Ordering::SeqCst);
    assert_eq!(
        open().append(&[rec("t", Some("a"), b"5")]).unwrap(),
        [Some(2)]
    );
    assert_eq!(
        payloads(&b.read("t", 0, 10).unwrap()),
        [&b"1"[..], b"3", b"5"]
    );
}

#[test]
fn a_new_appender_reads_the_dedup_file_not_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_segments(dir.path(), 1000, |_| {});
    for chunk in (0..100).step_by(5) {
        let mut batch = numbered("t", chunk..chunk + 5);
        for (i, r) in batch.iter_mut().enumerate() {
            let id = format!("id-{}", chunk + i as u64);
            r.headers
                .push((LOCKGATE_ID_HEADER.to_owned(), id.into_bytes()));
        }
        b.append(&batch).unwrap();
    }
    // Every segment but the last becomes garbage of the same length: a process that scanned
    // the log to learn the end or the ids would now get both wrong.
    let bases = segment_bases(dir.path(), "t");
    let topic_dir = dir.path().join("topics/t");
    for base in &bases[..bases.len() - 1] {
        let path = segment_path(&topic_dir, *base);
        let len = fs::metadata(&path).unwrap().len();
        fs::write(&path, vec![0xa5; len as usize]).unwrap();
    }
    let fresh = with_segments(dir.path(), 1000, |_| {});
    assert_eq!(fresh.end_offset("t").unwrap(), 100);
    let again: Vec<OutRecord> = [3, 42, 97]
        .iter()
        .map(|i| rec("t", Some(&format!("id-{i}")), b"again"))
        .chain([rec("t", Some("new"), b"new")])
        .collect();
    assert_eq!(fresh.append(&again).unwrap(), [None, None, None, Some(100)]);
    assert_eq!(payloads(&fresh.read("t", 100, 10).unwrap()), [b"new"]);
}

#[test]
fn frames_written_by_an_append_that_crashed_before_its_dedup_entry_are_learned() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    b.append(&[rec("t", Some("a"), b"a")]).unwrap();
    // A frame with id "x" lands in the segment, but its dedup entry never does.
    let seg = dir
        .path()
        .join("topics/t/segments/00000000000000000000.log");
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&encode_frame(crate::message::now_ms(), &rec("t", Some("x"), b"x")).unwrap())
        .unwrap();
    let second = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(second.end_offset("t").unwrap(), 2);
    assert_eq!(
        second
            .append(&[rec("t", Some("x"), b"x"), rec("t", Some("y"), b"y")])
            .unwrap(),
        [None, Some(2)]
    );
    // `second` wrote x into its entry: a third instance knows it without the crash gap.
    let third = LocalBroker::open(dir.path()).unwrap();
    {
        let t = third.topic("t");
        let mut st = t.state.lock().unwrap();
        t.sync(&mut st, false, true, &TopicSettings::default())
            .unwrap();
        assert!(st.unlogged.is_empty(), "every frame is in an entry");
        assert!(st.window.contains(b"x"));
    }
    assert_eq!(third.append(&[rec("t", Some("x"), b"x")]).unwrap(), [None]);
}

#[test]
fn a_segment_shorter_than_its_dedup_entry_forgets_the_window_instead_of_dropping_records() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    b.append(&[rec("t", Some("kept"), b"kept")]).unwrap();
    let seg = dir
        .path()
        .join("topics/t/segments/00000000000000000000.log");
    let kept_len = fs::metadata(&seg).unwrap().len();
    b.append(&[rec("t", Some("lost"), b"lost")]).unwrap();
    // A power loss without fsync kept the dedup entry but not the frame.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(kept_len)
        .unwrap();
    let fresh = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(
        fresh
            .append(&[
                rec("t", Some("lost"), b"lost"),
                rec("t", Some("kept"), b"kept")
            ])
            .unwrap(),
        [Some(1), None],
        "the lost record is stored again; the kept one is still known from its frame"
    );
}

#[test]
fn the_dedup_file_is_compacted_to_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_segments(dir.path(), DEFAULT_SEGMENT_BYTES, |s| {
        s.duplicate_window_ids = 100;
    });
    let id = |i: u64| format!("{i:040}");
    for batch in 0..5_000u64 {
        let records: Vec<_> = (0..10)
            .map(|j| rec("t", Some(&id(batch * 10 + j)), b""))
            .collect();
        b.append(&records).unwrap();
    }
    let dedup = fs::metadata(dir.path().join("topics/t/dedup"))
        .unwrap()
        .len();
    // 50,000 ids of 40 bytes took 2.6 MB of entries; compaction keeps at most 1 MiB plus a
    // window of 100 ids.
    assert!(dedup < (1 << 20) + 100 * 60, "{dedup} bytes");
    let fresh = with_segments(dir.path(), DEFAULT_SEGMENT_BYTES, |s| {
        s.duplicate_window_ids = 100;
    });
    assert_eq!(fresh.end_offset("t").unwrap(), 50_000);
    let got = fresh
        .append(&[
            rec("t", Some(&id(49_999)), b""),
            rec("t", Some(&id(49_900)), b""),
            rec("t", Some(&id(49_899)), b""),
        ])
        .unwrap();
    assert_eq!(got, [None, None, Some(50_000)]);
}

/// Appends 100 numbered records in 20 appends of 5 (10 segments of 10 at 1000 bytes), the
/// clock at `start + 1000 * append` when there is one.
fn fill(b: &LocalBroker, now: Option<(&AtomicU64, u64)>) {
    for (k, chunk) in (0..100).step_by(5).enumerate() {
        if let Some((now, start)) = now {
            now.store(start + 1000 * k as u64, Ordering::SeqCst);
        }
        b.append(&numbered("t", chunk..chunk + 5)).unwrap();
    }
}

#[test]
fn retention_by_bytes_deletes_whole_segments_oldest_first_but_never_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_segments(dir.path(), 1000, |s| s.max_bytes = Some(3000)).with_retention(true);
    fill(&b, None);
    // After each roll the oldest segments went: 3000 bytes hold two full segments and the new
    // one.
    assert!(
        b.size_bytes("t").unwrap() <= 3000,
        "{}",
        b.size_bytes("t").unwrap()
    );
    assert_eq!(segment_bases(dir.path(), "t"), [80, 90]);
    assert_eq!(b.start_offset("t").unwrap(), 80);
    assert_eq!(b.end_offset("t").unwrap(), 100);
    let from_zero = b.read("t", 0, 1000).unwrap();
    assert_eq!(from_zero.first().and_then(|r| r.offset), Some(80));
    assert_eq!(from_zero.len(), 20);
    // Even a limit below one segment keeps the last one.
    let tiny = with_segments(dir.path(), 1000, |s| s.max_bytes = Some(1));
    tiny.enforce_retention().unwrap();
    assert_eq!(segment_bases(dir.path(), "t"), [90]);
    assert_eq!(tiny.end_offset("t").unwrap(), 100);
    // The offsets go on after a fresh start.
    assert_eq!(
        LocalBroker::open(dir.path())
            .unwrap()
            .append(&numbered("t", 100..101))
            .unwrap(),
        [Some(100)]
    );
}

#[test]
fn retention_by_age_deletes_segments_whose_records_are_all_older() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, now) = test_clock(10_000_000);
    let b = with_segments(dir.path(), 1000, |s| {
        s.max_bytes = None;
        s.max_age = Some(Duration::from_millis(5_500));
    })
    .with_clock(clock);
    // Append k at 10,000,000 + 1000 k: segment j holds appends 2j and 2j+1.
    fill(&b, Some((&now, 10_000_000)));
    assert_eq!(segment_bases(dir.path(), "t").len(), 10);
    // At +20,000 ms records appended before +14,500 are too old. Segment j goes if segment
    // j+1 starts (append 2j+2, at +(2j+2) s) before that: j = 0..=6.
    now.store(10_020_000, Ordering::SeqCst);
    let removed = b.enforce_retention().unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(
        (removed[0].segments, removed[0].offsets.clone()),
        (7, 0..70)
    );
    assert_eq!(segment_bases(dir.path(), "t"), [70, 80, 90]);
    // Much later everything is old, but the last segment stays.
    now.store(20_000_000, Ordering::SeqCst);
    b.enforce_retention().unwrap();
    assert_eq!(segment_bases(dir.path(), "t"), [90]);
}

#[tokio::test]
async fn retention_never_deletes_what_a_group_has_not_committed_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_segments(dir.path(), 1000, |s| s.max_bytes = Some(1));
    // Group g has consumed 25 records.
    b.append(&numbered("t", 0..5)).unwrap();
    let mut s = b.source("t", "g").unwrap();
    fill_from(&b, 5);
    for _ in 0..25 {
        next(&mut s).await.ack.ack(AckKind::Done).await.unwrap();
    }
    s.commit().await.unwrap();
    drop(s);
    b.enforce_retention().unwrap();
    // Segment 20..29 holds offset 25, which g has not consumed: it and all after it stay.
    assert_eq!(
        segment_bases(dir.path(), "t"),
        (20..100).step_by(10).collect::<Vec<_>>()
    );
    let mut s = b.source("t", "g").unwrap();
    assert_eq!(next(&mut s).await.record.offset, Some(25));
    drop(s);

    // Told to: a group behind retention loses the records and continues at the earliest.
    let unconsumed = with_segments(dir.path(), 1000, |s| {
        s.max_bytes = Some(1);
        s.delete_unconsumed = true;
    });
    unconsumed.enforce_retention().unwrap();
    assert_eq!(segment_bases(dir.path(), "t"), [90]);
    let mut s = unconsumed.source("t", "g").unwrap();
    let d = next(&mut s).await;
    assert_eq!((d.record.offset, number(&d.record)), (Some(90), 90));
    let scanned = {
        let mut scan = unconsumed.scan("t").unwrap();
        let mut all = Vec::new();
        while let Some(batch) = scan.next_batch().await.unwrap() {
            all.extend(batch.iter().map(|r| r.offset.unwrap()));
        }
        all
    };
    assert_eq!(scanned, (90..100).collect::<Vec<_>>());
}

/// Appends records `from..100` in appends of five.
fn fill_from(b: &LocalBroker, from: u64) {
    for chunk in (from..100).step_by(5) {
        b.append(&numbered("t", chunk..chunk + 5)).unwrap();
    }
}

#[test]
fn dlq_topics_have_no_limits_unless_their_own_settings_give_some() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = LocalSettings {
        defaults: TopicSettings {
            segment_bytes: 1000,
            max_bytes: Some(1),
            max_age: Some(Duration::from_millis(1)),
            ..TopicSettings::default()
        },
        ..LocalSettings::default()
    };
    settings.dlq_topics.insert("t".to_owned());
    let b = LocalBroker::open(dir.path())
        .unwrap()
        .with_settings(settings.clone())
        .with_retention(true);
    fill(&b, None);
    b.enforce_retention().unwrap();
    assert_eq!(segment_bases(dir.path(), "t").len(), 10);
    settings.topics.insert(
        "t".to_owned(),
        TopicOverride {
            max_bytes: Some(Some(2000)),
            ..TopicOverride::default()
        },
    );
    b.set_settings(settings);
    b.enforce_retention().unwrap();
    assert_eq!(segment_bases(dir.path(), "t"), [90]);
}

#[tokio::test]
async fn a_single_file_log_of_an_older_lockgate_is_read_and_moved_into_segments() {
    let dir = tempfile::tempdir().unwrap();
    let topic_dir = dir.path().join("topics/t");
    fs::create_dir_all(topic_dir.join("groups")).unwrap();
    // The old layout: topics/t/log with the same frames, a group file without `segment`.
    let now = crate::message::now_ms();
    let mut log = Vec::new();
    let mut second = 0;
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        if i == 2 {
            second = log.len();
        }
        log.extend(encode_frame(now, &rec("t", Some(id), id.as_bytes())).unwrap());
    }
    fs::write(topic_dir.join("log"), &log).unwrap();
    fs::write(
        topic_dir.join("groups/g"),
        format!(r#"{{"offset":2,"position":{second}}}"#),
    )
    .unwrap();

    let b = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(b.end_offset("t").unwrap(), 3);
    assert_eq!(payloads(&b.read("t", 0, 10).unwrap()), [b"a", b"b", b"c"]);
    let mut early = b
        .source("t", "early")
        .unwrap()
        .with_poll(Duration::from_millis(10));
    assert_eq!(next(&mut early).await.record.payload, b"a");
    let mut s = b.source("t", "g").unwrap();
    assert_eq!(next(&mut s).await.record.payload, b"c");

    // The first append moves the log (readers keep going) and knows its ids.
    let writer = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(
        writer
            .append(&[rec("t", Some("b"), b"b"), rec("t", Some("d"), b"d")])
            .unwrap(),
        [None, Some(3)]
    );
    assert!(!topic_dir.join("log").exists());
    assert!(segment_path(&topic_dir, 0).is_file());
    for want in [&b"b"[..], b"c", b"d"] {
        assert_eq!(next(&mut early).await.record.payload, want);
    }
    assert_eq!(next(&mut s).await.record.offset, Some(3));
    let fresh = LocalBroker::open(dir.path()).unwrap();
    assert_eq!(
        payloads(&fresh.read("t", 0, 10).unwrap()),
        [b"a", b"b", b"c", b"d"]
    );
    assert_eq!(fresh.append(&[rec("t", Some("a"), b"a")]).unwrap(), [None]);
    assert_eq!(fresh.committed("t", "g").unwrap(), 2);
}

/// Publishes from many tasks at once are merged into shared appends (`sink.rs`): every record
/// lands once, each publish's records together and in order, and a publish with an invalid
/// record fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_land_whole_and_a_bad_one_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBroker::open(dir.path()).unwrap();
    let sink = b.sink();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut bad = 0;
                for p in 0..50 {
                    let mut records: Vec<OutRecord> = (0..3)
                        .map(|i| {
                            let id = format!("{t}/{p}/{i}");
                            rec("t", Some(&id), id.as_bytes())
                        })
                        .collect();
                    if p % 10 == 7 {
                        records.push(rec("not/a topic", None, b"x"));
                        let err = sink.publish(records).await.unwrap_err();
                        assert!(matches!(err, BrokerError::Invalid(_)), "{err}");
                        bad += 1;
                    } else {
                        sink.publish(records).await.unwrap();
                    }
                }
                bad
            })
        })
        .collect();
    let mut bad = 0;
    for t in tasks {
        bad += t.await.unwrap();
    }
    assert_eq!(bad, 8 * 5);
    let all = b.read("t", 0, 10_000).unwrap();
    let got: Vec<String> = all
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect();
    assert_eq!(got.len(), 8 * 45 * 3, "every valid record once");
    for publish in got.chunks(3) {
        let (t, p) = publish[0]
            .rsplit_once('/')
            .unwrap()
            .0
            .split_once('/')
            .unwrap();
        let expected: Vec<String> = (0..3).map(|i| format!("{t}/{p}/{i}")).collect();
        assert_eq!(
            publish,
            expected.as_slice(),
            "a publish's records together, in order"
        );
    }
}
