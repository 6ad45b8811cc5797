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
//!   Redis's clock), `a:<lease end ms>:<owner>|<outputs>` once the handler's effects are
//!   committed (no native expiry: it must outlive a crash until someone publishes the
//!   outputs), `d` once done and `x` once dead-lettered (with the TTL as their expiry; a
//!   replayed copy may claim an `x` key again).
//!
//! Every script touches the keys of one message only; a Redis Cluster would need them in one
//! hash slot, so the store targets a single Redis (or a primary with replicas).
//!
//! The length in front of the namespace keeps `("a:b", "c")` and `("a", "b:c")` apart.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{
    Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvStore, KvWrite, StateError,
};

use crate::message::now_ms;
use futures_util::future::BoxFuture;

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

/// Server time in ms, and the parts of an applied record (lease end, owner, outputs).
const LUA_HELPERS: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function applied(v)
  if string.sub(v, 1, 2) ~= 'a:' then return nil end
  local sep = string.find(v, ':', 3, true)
  local bar = string.find(v, '|', sep + 1, true)
  return tonumber(string.sub(v, 3, sep - 1)), string.sub(v, sep + 1, bar - 1), string.sub(v, bar + 1)
end
local function applied_record(until_ms, owner, outputs)
  return 'a:' .. string.format('%d', until_ms) .. ':' .. owner .. '|' .. outputs
end
";

/// KEYS: records; ARGV: lease ms, then per key its owner and whether it is a replay ('1'/'0').
/// Answers per key: 0 claimed, -1 done, -2 dead-lettered, n > 0 busy for n more ms, a string:
/// applied, these are the outputs.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{LUA_HELPERS}
local lease = tonumber(ARGV[1])
local out = {{}}
for i, k in ipairs(KEYS) do
  local owner = ARGV[2 * i]
  local mine = 'c:' .. owner
  local v = redis.call('GET', k)
  if not v or (v == 'x' and ARGV[2 * i + 1] == '1') then
    redis.call('SET', k, mine, 'PX', lease)
    out[i] = 0
  elseif v == 'd' then
    out[i] = -1
  elseif v == 'x' then
    out[i] = -2
  elseif v == mine then
    redis.call('PEXPIRE', k, lease)
    out[i] = 0
  else
    local until_ms, holder, outputs = applied(v)
    local now = now_ms()
    if until_ms and (holder == owner or until_ms <= now) then
      redis.call('SET', k, applied_record(now + lease, owner, outputs))
      out[i] = outputs
    elseif until_ms then
      out[i] = math.max(until_ms - now, 1)
    else
      out[i] = math.max(redis.call('PTTL', k), 1)
    end
  end
end
return out"
    ))
});

/// KEYS: the record, then one kv key per write. ARGV: owner, lease ms, outputs, now ms, then six
/// per write: expectation (0 none, 1 absent, 2 this value), expected value, has a value (0/1),
/// value, expiry (''), gc at (''). Answers {0} committed, {1} already committed by this owner,
/// {2} lost the claim, {3, j} write j's expectation failed.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{LUA_HELPERS}
local owner = ARGV[1]
local v = redis.call('GET', KEYS[1])
if v ~= 'c:' .. owner then
  if v then
    local until_ms, holder = applied(v)
    if until_ms and holder == owner then return {{1}} end
  end
  return {{2}}
end
local now = tonumber(ARGV[4])
for j = 2, #KEYS do
  local b = 4 + (j - 2) * 6
  local expect = ARGV[b + 1]
  if expect ~= '0' then
    local cur = redis.call('HMGET', KEYS[j], 'v', 'e')
    local visible = cur[1]
    if visible and cur[2] and tonumber(cur[2]) <= now then visible = false end
    if expect == '1' and visible then return {{3, j - 1}} end
    if expect == '2' and ((not visible) or visible ~= ARGV[b + 2]) then return {{3, j - 1}} end
  end
end
for j = 2, #KEYS do
  local b = 4 + (j - 2) * 6
  redis.call('DEL', KEYS[j])
  if ARGV[b + 3] == '1' then
    redis.call('HSET', KEYS[j], 'v', ARGV[b + 4])
    if ARGV[b + 5] ~= '' then redis.call('HSET', KEYS[j], 'e', ARGV[b + 5]) end
    if ARGV[b + 6] ~= '' then redis.call('PEXPIREAT', KEYS[j], ARGV[b + 6]) end
  end
end
redis.call('SET', KEYS[1], applied_record(now_ms() + tonumber(ARGV[2]), owner, ARGV[3]))
return {{0}}"
    ))
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

    /// Blocks on `f` for a guest's kv call, no longer than the call's deadline.
    fn block<T>(&self, f: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
        self.runtime
            .block_on(crate::deadline::bound_current(f))
            .map_err(|_| StateError::DeadlineExceeded)?
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
                call.key(self.idem_key(&scope, &r.key))
                    .arg(&r.owner)
                    .arg(if r.replay { "1" } else { "0" });
            }
            let mut c = self.conn.clone();
            let answers: Vec<redis::Value> =
                call.invoke_async(&mut c).await.map_err(|e| self.err(&e))?;
            if answers.len() != requests.len() {
                return Err(StateError::Unavailable(format!(
                    "redis at {}: claim script answered {} of {} keys",
                    self.addr,
                    answers.len(),
                    requests.len()
                )));
            }
            answers
                .into_iter()
                .map(|v| match v {
                    redis::Value::Int(0) => Ok(Claim::Claimed),
                    redis::Value::Int(-2) => Ok(Claim::DeadLettered),
                    redis::Value::Int(n) if n < 0 => Ok(Claim::Done),
                    redis::Value::Int(n) => {
                        Ok(Claim::Busy(Duration::from_millis(n.unsigned_abs())))
                    }
                    redis::Value::BulkString(outputs) => Ok(Claim::Applied(outputs)),
                    other => Err(StateError::Unavailable(format!(
                        "redis at {}: unexpected claim answer {other:?}",
                        self.addr
                    ))),
                })
                .collect()
        })
    }

    fn complete(
        &self,
        scope: String,
        keys: Vec<String>,
        ttl: Duration,
        how: Completion,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let value = match how {
                Completion::Done => "d",
                Completion::DeadLettered => "x",
            };
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("SET")
                    .arg(self.idem_key(&scope, k))
                    .arg(value)
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

    fn commit(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            let call = self.commit_call(&scope, &claim, &writes, &outputs, lease);
            let mut c = self.conn.clone();
            let answer: Vec<i64> = call.invoke_async(&mut c).await.map_err(|e| self.err(&e))?;
            Ok(match answer.as_slice() {
                [0] | [1] => Commit::Committed,
                [3, j] => Commit::Conflict(
                    usize::try_from(*j - 1)
                        .ok()
                        .and_then(|j| writes.get(j))
                        .map(|w| w.key.clone())
                        .unwrap_or_default(),
                ),
                _ => Commit::LostClaim,
            })
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
    fn commit_call(
        &self,
        scope: &str,
        claim: &ClaimRequest,
        writes: &[KvWrite],
        outputs: &[u8],
        lease: Duration,
    ) -> redis::ScriptInvocation<'static> {
        let mut call = COMMIT.prepare_invoke();
        call.key(self.idem_key(scope, &claim.key))
            .arg(&claim.owner)
            .arg(millis(lease))
            .arg(outputs)
            .arg(now_ms());
        for w in writes {
            call.key(self.kv_key(&w.namespace, &w.key));
            match &w.expected {
                None => call.arg(0).arg(""),
                Some(None) => call.arg(1).arg(""),
                Some(Some(v)) => call.arg(2).arg(v.as_slice()),
            };
            call.arg(u8::from(w.value.is_some()))
                .arg(w.value.as_deref().unwrap_or_default())
                .arg(opt(w.expires_at_ms))
                .arg(opt(gc_at(w.expires_at_ms)));
        }
        call
    }

    /// Answers PING; for `lockgate check` and tests.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        c.ping::<String>().await.map(drop).map_err(|e| self.err(&e))
    }
}
