//! Redis as a shared state store: guest kv and idempotency claims for routes that run on several
//! processes.
//!
//! One multiplexed connection (redis-rs `ConnectionManager`, reconnecting in the background)
//! carries every request of the process, so the requests of the messages in flight are pipelined
//! on it; a claim or completion of many keys is one script call or one pipeline.
//!
//! Layout (every key starts with the configured prefix, default `lockgate`):
//! - kv: `<prefix>:kv:<len(ns)>:<ns>:<key>`, a hash `{v: value, e: expiry ms}`. The expiry is
//!   compared against the caller's clock like every other backend does; a native `PEXPIREAT`
//!   a minute after it only collects the garbage.
//! - idempotency: `<prefix>:idem:<len(scope)>:<scope>:<key>`, a string: `c:<owner>` while
//!   claimed (with the lease as its native expiry, so a crashed holder's claim vanishes on
//!   Redis's clock), `d` once done (with the TTL as its expiry).
//!
//! The length in front of the namespace keeps `("a:b", "c")` and `("a", "b:c")` apart.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{Claim, ClaimRequest, IdempotencyStore, KvStore, StateError, now_ms};
use crate::broker::BoxFuture;

/// How long after its logical expiry an entry is left for Redis to collect.
const GC_GRACE_MS: u64 = 60_000;

static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
if not cur[1] then return 0 end
redis.call('DEL', KEYS[1])
if cur[2] and tonumber(cur[2]) <= tonumber(ARGV[1]) then return 0 end
return 1",
    )
});

/// ARGV: now, has expected (0/1), expected, has new (0/1), new, expiry ('' = none), gc at ('').
static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
local visible = cur[1]
if visible and cur[2] and tonumber(cur[2]) <= tonumber(ARGV[1]) then visible = false end
if ARGV[2] == '1' then
  if (not visible) or visible ~= ARGV[3] then return 0 end
elseif visible then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'v', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'e', ARGV[6]) end
  if ARGV[7] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[7]) end
end
return 1",
    )
});

/// KEYS: records; ARGV: lease ms, then one owner per key. Answers per key: 0 claimed, -1 done,
/// n > 0 busy for n more ms.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i, k in ipairs(KEYS) do
  local mine = 'c:' .. ARGV[i + 1]
  local v = redis.call('GET', k)
  if not v then
    redis.call('SET', k, mine, 'PX', ARGV[1])
    out[i] = 0
  elseif v == 'd' then
    out[i] = -1
  elseif v == mine then
    redis.call('PEXPIRE', k, ARGV[1])
    out[i] = 0
  else
    local t = redis.call('PTTL', k)
    if t < 1 then t = 1 end
    out[i] = t
  end
end
return out",
    )
});

/// KEYS: records; ARGV: one owner per key. Deletes the claims those owners still hold.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == 'c:' .. ARGV[i] then redis.call('DEL', k) end
end
return 0",
    )
});

/// A Redis server as the state store.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    /// Where the server is, for error messages (never the password).
    addr: String,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.addr)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[user:password@]host:port[/db]`), every key
    /// under `prefix`. Connects lazily: an unreachable server shows as [`StateError::Unavailable`]
    /// on use, which pauses the routes that need it, rather than as a failed start. Must be
    /// called inside a tokio runtime, which the synchronous [`KvStore`] methods block on.
    pub fn new(url: &str, prefix: &str) -> Result<Self, StateError> {
        let client = redis::Client::open(url)
            .map_err(|e| StateError::Config(format!("not a Redis URL: {e}")))?;
        let addr = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            // Fail fast: the route's own retry loop backs off and reports.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(|e| StateError::Config(format!("redis at {addr}: {e}")))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StateError::Config("the Redis store must be created inside a tokio runtime".into())
        })?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            addr,
            runtime,
        })
    }

    fn err(&self, e: &redis::RedisError) -> StateError {
        StateError::Unavailable(format!("redis at {}: {e}", self.addr))
    }

    fn kv_key(&self, namespace: &str, key: &str) -> String {
        format!("{}:kv:{}:{namespace}:{key}", self.prefix, namespace.len())
    }

    fn idem_key(&self, scope: &str, key: &str) -> String {
        format!("{}:idem:{}:{scope}:{key}", self.prefix, scope.len())
    }

    fn block<T>(&self, f: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
        self.runtime.block_on(f)
    }
}

/// When Redis may drop an entry that is logically gone at `expires_at_ms`: only when that is
/// still ahead, so an entry written with an expiry already past (the conformance suite's fake
/// clock) is judged by its stored expiry alone.
fn gc_at(expires_at_ms: Option<u64>) -> Option<u64> {
    let at = expires_at_ms?.saturating_add(GC_GRACE_MS);
    (at > now_ms()).then_some(at)
}

fn opt(v: Option<u64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_default()
}

impl KvStore for RedisStore {
    fn get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>, StateError> {
        let k = self.kv_key(namespace, key);
        self.block(async {
            let mut c = self.conn.clone();
            let (v, e): (Option<Vec<u8>>, Option<u64>) = redis::cmd("HMGET")
                .arg(&k)
                .arg("v")
                .arg("e")
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(&e))?;
            Ok(v.filter(|_| e.is_none_or(|e| e > now_ms)))
        })
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        self.set_many(
            namespace,
            &[(key.to_owned(), value.to_vec())],
            expires_at_ms,
        )
    }

    fn set_many(
        &self,
        namespace: &str,
        entries: &[(String, Vec<u8>)],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (key, value) in entries {
            let k = self.kv_key(namespace, key);
            pipe.del(&k).ignore();
            pipe.hset(&k, "v", value.as_slice()).ignore();
            if let Some(e) = expires_at_ms {
                pipe.hset(&k, "e", e).ignore();
            }
            if let Some(at) = gc_at(expires_at_ms) {
                pipe.cmd("PEXPIREAT").arg(&k).arg(at).ignore();
            }
        }
        self.block(async {
            let mut c = self.conn.clone();
            pipe.query_async::<()>(&mut c)
                .await
                .map_err(|e| self.err(&e))
        })
    }

    fn delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool, StateError> {
        let k = self.kv_key(namespace, key);
        self.block(async {
            let mut c = self.conn.clone();
            let n: i64 = DELETE
                .key(&k)
                .arg(now_ms)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err(&e))?;
            Ok(n == 1)
        })
    }

    fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool, StateError> {
        let k = self.kv_key(namespace, key);
        self.block(async {
            let mut c = self.conn.clone();
            let n: i64 = CAS
                .key(&k)
                .arg(now_ms)
                .arg(u8::from(expected.is_some()))
                .arg(expected.unwrap_or_default())
                .arg(u8::from(new.is_some()))
                .arg(new.unwrap_or_default())
                .arg(opt(expires_at_ms))
                .arg(opt(gc_at(expires_at_ms)))
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err(&e))?;
            Ok(n == 1)
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl IdempotencyStore for RedisStore {
    fn claim(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claim>, StateError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            let mut call = CLAIM.prepare_invoke();
            call.arg(millis(lease));
            for r in &requests {
                call.key(self.idem_key(&scope, &r.key)).arg(&r.owner);
            }
            let mut c = self.conn.clone();
            let answers: Vec<i64> = call.invoke_async(&mut c).await.map_err(|e| self.err(&e))?;
            if answers.len() != requests.len() {
                return Err(StateError::Unavailable(format!(
                    "redis at {}: claim script answered {} of {} keys",
                    self.addr,
                    answers.len(),
                    requests.len()
                )));
            }
            Ok(answers
                .into_iter()
                .map(|n| match n {
                    0 => Claim::Claimed,
                    n if n < 0 => Claim::Done,
                    n => Claim::Busy(Duration::from_millis(n.unsigned_abs())),
                })
                .collect())
        })
    }

    fn complete(
        &self,
        scope: String,
        keys: Vec<String>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("SET")
                    .arg(self.idem_key(&scope, k))
                    .arg("d")
                    .arg("PX")
                    .arg(millis(ttl))
                    .ignore();
            }
            let mut c = self.conn.clone();
            pipe.query_async::<()>(&mut c)
                .await
                .map_err(|e| self.err(&e))
        })
    }

    fn release(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(());
            }
            let mut call = RELEASE.prepare_invoke();
            for r in &requests {
                call.key(self.idem_key(&scope, &r.key)).arg(&r.owner);
            }
            let mut c = self.conn.clone();
            call.invoke_async::<i64>(&mut c)
                .await
                .map(drop)
                .map_err(|e| self.err(&e))
        })
    }
}

impl RedisStore {
    /// Answers PING; for `lockgate check` and tests.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        c.ping::<String>().await.map(drop).map_err(|e| self.err(&e))
    }
}
