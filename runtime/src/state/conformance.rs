//! The backend conformance suites: the semantics every state backend keeps (module doc of
//! [`crate::state`]), written once as assertions and run against each backend: memory and redb
//! in this crate's unit tests, Redis and PostgreSQL in `tests/tests/state_stores.rs` against real
//! servers. That is why the module is public (hidden from the docs): a new backend passes both
//! suites before it is wired in (docs/architecture.md#adding-a-state-store). Each suite panics on
//! the first broken rule.

#![allow(clippy::unwrap_used)]

/// The guest kv rules every [`KvStore`](crate::state::KvStore) keeps.
pub mod kv {
    use crate::state::KvStore;

    const T0: u64 = 1_000_000;

    /// Runs the shared semantics checks against `store` (which must be empty). Call it from a
    /// blocking thread: network backends block on their runtime.
    pub fn run(store: &dyn KvStore) {
        // get / set / overwrite
        assert_eq!(store.get("h", "a", T0).unwrap(), None);
        store.set("h", "a", b"1", None).unwrap();
        assert_eq!(store.get("h", "a", T0).unwrap().as_deref(), Some(&b"1"[..]));
        store.set("h", "a", b"2", None).unwrap();
        assert_eq!(store.get("h", "a", T0).unwrap().as_deref(), Some(&b"2"[..]));

        // namespaces are isolated
        assert_eq!(store.get("other", "a", T0).unwrap(), None);

        // TTL: visible before expiry, gone at and after it
        store.set("h", "t", b"x", Some(T0 + 100)).unwrap();
        assert!(store.get("h", "t", T0 + 99).unwrap().is_some());
        assert_eq!(store.get("h", "t", T0 + 100).unwrap(), None);

        // delete reports presence; deleting an expired entry reports absence
        assert!(store.delete("h", "a", T0).unwrap());
        assert!(!store.delete("h", "a", T0).unwrap());
        assert!(!store.delete("h", "t", T0 + 200).unwrap());

        // CAS from absent, conflict, success, delete-by-CAS
        assert!(
            store
                .compare_and_swap("h", "c", None, Some(b"1"), None, T0)
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("h", "c", None, Some(b"9"), None, T0)
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("h", "c", Some(b"0"), Some(b"9"), None, T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "c", T0).unwrap().as_deref(), Some(&b"1"[..]));
        assert!(
            store
                .compare_and_swap("h", "c", Some(b"1"), Some(b"2"), None, T0)
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("h", "c", Some(b"2"), None, None, T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "c", T0).unwrap(), None);

        // an expired entry compares equal to absent
        store.set("h", "e", b"old", Some(T0 + 10)).unwrap();
        assert!(
            !store
                .compare_and_swap("h", "e", None, Some(b"new"), None, T0)
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("h", "e", None, Some(b"new"), None, T0 + 10)
                .unwrap()
        );
        assert_eq!(
            store.get("h", "e", T0 + 20).unwrap().as_deref(),
            Some(&b"new"[..])
        );

        // CAS can set a TTL
        assert!(
            store
                .compare_and_swap("h", "ct", None, Some(b"v"), Some(T0 + 5), T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "ct", T0 + 5).unwrap(), None);

        // set_many writes every entry with the one expiry
        store
            .set_many(
                "m",
                &[("x".into(), b"1".to_vec()), ("y".into(), b"2".to_vec())],
                Some(T0 + 50),
            )
            .unwrap();
        assert_eq!(store.get("m", "y", T0).unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.get("m", "x", T0 + 50).unwrap(), None);

        // binary values and keys with separators survive unchanged
        let bin: Vec<u8> = (0..=255).collect();
        store.set("h:x", "y:z/é", &bin, None).unwrap();
        assert_eq!(store.get("h:x", "y:z/é", T0).unwrap(), Some(bin));
        assert_eq!(store.get("h", "x:y:z/é", T0).unwrap(), None);
    }
}

/// The claim rules every [`IdempotencyStore`](crate::state::IdempotencyStore) keeps. The store must be empty.
pub mod claims {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::state::{
        Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvStore, KvWrite,
    };

    use crate::message::now_ms;

    const LEASE: Duration = Duration::from_secs(30);

    fn req(key: &str, owner: &str) -> ClaimRequest {
        ClaimRequest::new(key, owner)
    }

    fn replay(key: &str, owner: &str) -> ClaimRequest {
        ClaimRequest {
            replay: true,
            ..ClaimRequest::new(key, owner)
        }
    }

    async fn claim_one(store: &dyn IdempotencyStore, scope: &str, r: ClaimRequest) -> Claim {
        let mut v = store.claim(scope.into(), vec![r], LEASE).await.unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    async fn claim(store: &dyn IdempotencyStore, scope: &str, key: &str, owner: &str) -> Claim {
        claim_one(store, scope, req(key, owner)).await
    }

    /// Polls until `key` can be claimed by a new owner; panics after 10 s. Returns how long it
    /// took.
    async fn until_claimable(store: &dyn IdempotencyStore, scope: &str, key: &str) -> Duration {
        let start = Instant::now();
        loop {
            match claim(store, scope, key, "poller").await {
                Claim::Claimed => return start.elapsed(),
                other => assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{key} still {other:?} after 10 s"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn write(key: &str, value: Option<&[u8]>, expected: Option<Option<&[u8]>>) -> KvWrite {
        KvWrite {
            namespace: "h".into(),
            key: key.into(),
            value: value.map(<[u8]>::to_vec),
            expires_at_ms: None,
            expected: expected.map(|e| e.map(<[u8]>::to_vec)),
        }
    }

    async fn kv_get(kv: &Arc<dyn KvStore>, key: &str) -> Option<Vec<u8>> {
        let (kv, key) = (kv.clone(), key.to_owned());
        tokio::task::spawn_blocking(move || kv.get("h", &key, now_ms()).unwrap())
            .await
            .unwrap()
    }

    /// Runs the checks; `kv` is the same backend's kv side (namespace `h` must be empty).
    pub async fn run(store: &dyn IdempotencyStore, kv: Arc<dyn KvStore>) {
        let s = "idempotency/r";
        assert_eq!(claim(store, s, "k1", "o1").await, Claim::Claimed);
        match claim(store, s, "k1", "o2").await {
            Claim::Busy(d) => assert!(d <= LEASE && d > Duration::ZERO, "{d:?}"),
            other => panic!("a live claim must make others wait, got {other:?}"),
        }
        // The holder may ask again (a retry of its own request).
        assert_eq!(claim(store, s, "k1", "o1").await, Claim::Claimed);
        // Only the holder can release.
        store
            .release(s.into(), vec![req("k1", "o2")])
            .await
            .unwrap();
        assert!(matches!(claim(store, s, "k1", "o2").await, Claim::Busy(_)));
        store
            .release(s.into(), vec![req("k1", "o1")])
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o2").await, Claim::Claimed);
        // Done is done for everyone, the holder included.
        store
            .complete(
                s.into(),
                vec!["k1".into()],
                Duration::from_secs(60),
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o3").await, Claim::Done);
        assert_eq!(claim(store, s, "k1", "o2").await, Claim::Done);
        // Releasing a done key leaves it done.
        store
            .release(s.into(), vec![req("k1", "o2")])
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o4").await, Claim::Done);
        // Scopes are separate.
        assert_eq!(
            claim(store, "idempotency/other", "k1", "o1").await,
            Claim::Claimed
        );

        // Many keys in one call, answers in order; a key asked twice is claimed once.
        let answers = store
            .claim(
                s.into(),
                vec![
                    req("b1", "x"),
                    req("k1", "x"),
                    req("b2", "x"),
                    req("b1", "y"),
                ],
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(answers.len(), 4);
        assert_eq!(answers[0], Claim::Claimed);
        assert_eq!(answers[1], Claim::Done);
        assert_eq!(answers[2], Claim::Claimed);
        assert!(matches!(answers[3], Claim::Busy(_)), "{:?}", answers[3]);
        store
            .complete(
                s.into(),
                vec!["b1".into(), "b2".into()],
                LEASE,
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "b2", "z").await, Claim::Done);

        // A crashed holder's lease runs out.
        let lease = Duration::from_millis(300);
        let got = store
            .claim(s.into(), vec![req("l1", "crashed")], lease)
            .await
            .unwrap();
        assert_eq!(got, vec![Claim::Claimed]);
        let waited = until_claimable(store, s, "l1").await;
        assert!(
            waited >= lease / 2,
            "claimable after {waited:?}, lease {lease:?}"
        );

        // Done records expire with their TTL.
        store
            .complete(
                s.into(),
                vec!["t1".into()],
                Duration::from_millis(300),
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "t1", "o").await, Claim::Done);
        until_claimable(store, s, "t1").await;

        dead_letters(store).await;
        commits(store, &kv).await;
    }

    /// A dead-lettered key: redeliveries are skipped, a replay may claim it again (once: its
    /// success makes the key done), a replay of a key that succeeded is a duplicate.
    async fn dead_letters(store: &dyn IdempotencyStore) {
        let s = "idempotency/d";
        let ttl = Duration::from_secs(60);
        assert_eq!(claim(store, s, "x1", "o1").await, Claim::Claimed);
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::DeadLettered)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "x1", "o2").await, Claim::DeadLettered);
        assert_eq!(
            claim_one(store, s, replay("x1", "r1")).await,
            Claim::Claimed
        );
        // While the replay holds it, everyone else waits (a second replay copy included).
        assert!(matches!(claim(store, s, "x1", "o3").await, Claim::Busy(_)));
        assert!(matches!(
            claim_one(store, s, replay("x1", "r2")).await,
            Claim::Busy(_)
        ));
        // The replay failed again: dead-lettered again, and a later replay may run it.
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::DeadLettered)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "x1", "o4").await, Claim::DeadLettered);
        assert_eq!(
            claim_one(store, s, replay("x1", "r3")).await,
            Claim::Claimed
        );
        // A released replay claim leaves the key claimable, by a replay or anyone.
        store
            .release(s.into(), vec![replay("x1", "r3")])
            .await
            .unwrap();
        assert_eq!(
            claim_one(store, s, replay("x1", "r4")).await,
            Claim::Claimed
        );
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::Done)
            .await
            .unwrap();
        // Succeeded: done for redeliveries and replays alike.
        assert_eq!(claim(store, s, "x1", "o5").await, Claim::Done);
        assert_eq!(claim_one(store, s, replay("x1", "r5")).await, Claim::Done);
        // A replay of a key never seen is an ordinary claim; many keys mix in one call.
        let answers = store
            .claim(
                s.into(),
                vec![replay("x2", "m"), req("x1", "m"), replay("x3", "m")],
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(answers, vec![Claim::Claimed, Claim::Done, Claim::Claimed]);
        store
            .complete(
                s.into(),
                vec!["x2".into(), "x3".into()],
                ttl,
                Completion::DeadLettered,
            )
            .await
            .unwrap();
        let answers = store
            .claim(s.into(), vec![req("x2", "n"), replay("x3", "n")], LEASE)
            .await
            .unwrap();
        assert_eq!(answers, vec![Claim::DeadLettered, Claim::Claimed]);
    }

    async fn commits(store: &dyn IdempotencyStore, kv: &Arc<dyn KvStore>) {
        let s = "idempotency/c";
        let commit = |key: &str, owner: &str, writes: Vec<KvWrite>, out: &[u8], lease| {
            store.commit(s.into(), req(key, owner), writes, out.to_vec(), lease)
        };
        // Effects and the applied mark, together; a retried commit is harmless.
        assert_eq!(claim(store, s, "c1", "o1").await, Claim::Claimed);
        let w = vec![
            write("x", Some(b"1"), Some(None)),
            write("blind", Some(b"b"), None),
        ];
        assert_eq!(
            commit("c1", "o1", w.clone(), b"out1", LEASE).await.unwrap(),
            Commit::Committed
        );
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"1"[..]));
        assert_eq!(kv_get(kv, "blind").await.as_deref(), Some(&b"b"[..]));
        assert_eq!(
            commit("c1", "o1", w, b"out1", LEASE).await.unwrap(),
            Commit::Committed
        );
        // Applied and leased: others wait, and cannot commit.
        assert!(matches!(claim(store, s, "c1", "o2").await, Claim::Busy(_)));
        assert_eq!(
            commit("c1", "o2", vec![], b"", LEASE).await.unwrap(),
            Commit::LostClaim
        );
        assert_eq!(
            commit("never-claimed", "o2", vec![], b"", LEASE)
                .await
                .unwrap(),
            Commit::LostClaim
        );
        store
            .complete(s.into(), vec!["c1".into()], LEASE, Completion::Done)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "c1", "o2").await, Claim::Done);

        // A failed expectation applies nothing, not even the writes before it.
        assert_eq!(claim(store, s, "c2", "o1").await, Claim::Claimed);
        let w = vec![
            write("y", Some(b"1"), None),
            write("x", Some(b"2"), Some(Some(b"0"))),
        ];
        assert_eq!(
            commit("c2", "o1", w, b"", LEASE).await.unwrap(),
            Commit::Conflict("x".into())
        );
        assert_eq!(kv_get(kv, "y").await, None);
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"1"[..]));
        // Expectations that hold: replace, delete, absent-and-stays-absent.
        let w = vec![
            write("x", Some(b"2"), Some(Some(b"1"))),
            write("blind", None, Some(Some(b"b"))),
            write("nothing", None, Some(None)),
        ];
        assert_eq!(
            commit("c2", "o1", w, b"", LEASE).await.unwrap(),
            Commit::Committed
        );
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"2"[..]));
        assert_eq!(kv_get(kv, "blind").await, None);

        // A holder that crashed after committing: after its lease, the next claimant gets the
        // committed outputs instead of running the handler again.
        let lease = Duration::from_millis(300);
        let got = store
            .claim(s.into(), vec![req("c3", "crashed")], lease)
            .await
            .unwrap();
        assert_eq!(got, vec![Claim::Claimed]);
        assert_eq!(
            commit(
                "c3",
                "crashed",
                vec![write("z", Some(b"1"), None)],
                b"out\x003|:",
                lease
            )
            .await
            .unwrap(),
            Commit::Committed
        );
        assert!(matches!(
            claim(store, s, "c3", "next").await,
            Claim::Busy(_)
        ));
        let start = Instant::now();
        let outputs = loop {
            match claim(store, s, "c3", "next").await {
                Claim::Applied(out) => break out,
                Claim::Busy(_) => {}
                other => panic!("expected the committed outputs, got {other:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "lease never ran out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(outputs, b"out\x003|:");
        // The taker holds it now.
        assert!(matches!(
            claim(store, s, "c3", "third").await,
            Claim::Busy(_)
        ));
        assert_eq!(
            claim(store, s, "c3", "next").await,
            Claim::Applied(b"out\x003|:".to_vec())
        );
    }
}
