//! The web console (`GET /ui` of the admin endpoint) in a real browser: headless Chromium
//! (Debian's `chromium`) driven over the DevTools protocol against a `lockgate run` whose route
//! dead-lettered a poison message. It sees the route's counters update, opens the dead letter,
//! is refused a replay without the admin token and replays with it. Screenshots are kept in
//! `$CARGO_TARGET_DIR/tmp/console-screenshots/`.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use lockgate_tests::admin::{admin_addr, get};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run_with_env, stop_run};
use serde_json::{Value, json};
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

const TOKEN: &str = "console-t0ken";

/// How long anything the test waits for may take (a slow CI machine included).
const DEADLINE: Duration = Duration::from_secs(60);

/// Where the screenshots go (kept after the test as artefacts).
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

/// One route `orders`: the chaos guest from local topic `in` to `out`; a poison message is
/// rejected and dead-lettered at once.
fn write_config(dir: &Path) -> PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nstate_dir = \"state\"\nadmin = \"127.0.0.1:0\"\nadmin_token = {{ env = \"LG_CONSOLE_TOKEN\" }}\nwatch = \"off\"\n\n[handlers.chaos]\nmodule = \"{}\"\nconfig = {{ target = \"out\" }}\n\n[routes.orders]\nhandler = \"chaos\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\n",
            guest("chaos").display()
        ),
    )
    .unwrap();
    config
}

fn send(dir: &Path, payload: &str) {
    let out = lockgate(dir, &["send", "in", payload, "--config", "runtime.toml"]);
    assert!(out.status.success(), "{}", show(&out));
}

/// The route's entry in `/status`.
fn route_status(addr: &str) -> Value {
    let (code, body) = get(addr, "/status");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["routes"][0].clone()
}

/// Headless Chromium, killed on drop, and a DevTools session on one page.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    session: Option<String>,
    /// Events received so far (method and params).
    events: Vec<Value>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn start() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromium ({e}): install Debian's `chromium` package")
            });
        // Chromium prints its DevTools websocket on stderr once it listens.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(Ok(url.trim().to_owned()));
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            let _ = tx.send(Err(seen));
        });
        let url = match rx.recv_timeout(DEADLINE) {
            Ok(Ok(url)) => url,
            Ok(Err(out)) => panic!("chromium exited before listening:\n{out}"),
            Err(e) => panic!("chromium did not listen within {DEADLINE:?}: {e}"),
        };
        let (ws, _) = ClientBuilder::new()
            .uri(&url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut browser = Self {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            session: None,
            events: Vec::new(),
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        for domain in ["Page.enable", "Runtime.enable", "Network.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Sends a DevTools command and returns its result; events that arrive meanwhile are kept.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within {DEADLINE:?}"))
                .unwrap_or_else(|| panic!("chromium closed the DevTools socket during {method}"))
                .unwrap();
            let Some(text) = frame.as_text() else {
                continue;
            };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `ok` accepts its value (or the deadline: then it panics
    /// with `what` and the last value).
    async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let v = self.eval(expression).await;
            if ok(&v) {
                return v;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the page never showed {what}: last {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's text at `selector` (empty when absent).
    fn text(selector: &str) -> String {
        format!(
            "(document.querySelector({}) || {{textContent: ''}}).textContent",
            json!(selector)
        )
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// Saves a PNG of what the page shows to the screenshot directory.
    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Every URL the page requested so far.
    fn requested(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_owned))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_route_and_replays_a_dead_letter_only_with_the_token() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    send(dir.path(), r#"{"id":1}"#);
    send(dir.path(), r#"{"id":2,"poison":true}"#);
    send(dir.path(), r#"{"id":3}"#);
    let mut run = start_run_with_env(
        dir.path(),
        &config,
        1,
        None,
        "lockgate=info,warn",
        &[("LG_CONSOLE_TOKEN", TOKEN)],
    );
    let addr = admin_addr(&mut run, dir.path(), 1);
    let wait_start = Instant::now();
    while !(route_status(&addr)["dead_lettered"] == 1 && route_status(&addr)["succeeded"] == 2) {
        assert!(
            wait_start.elapsed() < DEADLINE,
            "{}\n{}",
            route_status(&addr),
            run_logs(dir.path(), 1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without the token (or with a wrong one) the JSON refuses a replay outright.
    for token in [None, Some("wrong")] {
        let (code, body) =
            lockgate::telemetry::http_request(&addr, "POST", "/ui/api/replay", token).unwrap();
        assert_eq!(code, 401, "{body}");
    }

    let mut b = Browser::start().await;
    b.viewport(1280, 900, false).await;
    let base = format!("http://{addr}");
    b.call("Page.navigate", json!({"url": format!("{base}/ui")}))
        .await;
    b.wait_for("a loaded document", "document.readyState", |v| {
        v == "complete"
    })
    .await;
    let load_ms = b
        .eval("performance.getEntriesByType('navigation')[0].loadEventEnd")
        .await
        .as_f64()
        .unwrap();
    assert!(load_ms < 1000.0, "the page took {load_ms} ms to load");

    // The route, its state and its counters.
    let received = "[data-route=\"orders\"] [data-counter=\"received\"]";
    b.wait_for("3 received", &Browser::text(received), |v| v == "3")
        .await;
    assert_eq!(
        b.eval(&Browser::text(
            "[data-route=\"orders\"] [data-field=\"state\"]"
        ))
        .await,
        "running"
    );
    assert_eq!(
        b.eval(&Browser::text(
            "[data-route=\"orders\"] [data-counter=\"dead_lettered\"]"
        ))
        .await,
        "1"
    );
    // 20 more while the page watches: the counter moves and the rate chart shows them.
    let lines: Vec<String> = (4..24)
        .map(|i| json!({"payload": format!(r#"{{"id":{i}}}"#)}).to_string())
        .collect();
    std::fs::write(dir.path().join("more.jsonl"), lines.join("\n")).unwrap();
    let out = lockgate(
        dir.path(),
        &[
            "send",
            "in",
            "--file",
            "more.jsonl",
            "--config",
            "runtime.toml",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    b.wait_for("the counter move to 23", &Browser::text(received), |v| {
        v == "23"
    })
    .await;
    b.wait_for(
        "a rate chart with points",
        "document.querySelectorAll('[data-route=\"orders\"] polyline[points*=\",\"]').length",
        |v| v.as_u64().unwrap_or(0) >= 2,
    )
    .await;
    // The burst is over once the chart's latest rate is back to 0 (it is then drawn whole).
    b.wait_for(
        "the rate back to 0 after the burst",
        &Browser::text("[data-route=\"orders\"] .legend .l0"),
        |v| v == "in 0",
    )
    .await;
    b.screenshot("console-routes").await;

    // The dead letter: listed with its reason; its payload needs the token.
    let row = "#dead-letters tbody tr[data-position]";
    let position = b
        .wait_for(
            "the dead letter in the list",
            &format!(
                "(document.querySelector('{row}') || {{dataset: {{}}}}).dataset.position || ''"
            ),
            |v| v.as_str().is_some_and(|s| !s.is_empty()),
        )
        .await;
    let position = position.as_str().unwrap().to_owned();
    assert_eq!(
        b.eval(&Browser::text(&format!("{row} td.status"))).await,
        "pending"
    );
    assert_eq!(
        b.eval(&Browser::text(&format!("{row} td.why"))).await,
        "order 2 is poison"
    );
    b.eval(&format!("document.querySelector('{row}').click()"))
        .await;
    b.wait_for(
        "the letter refused without the token",
        &Browser::text("#letter-meta"),
        |v| v.as_str().is_some_and(|s| s.contains("HTTP 401")),
    )
    .await;
    assert_eq!(b.eval(&Browser::text("#letter-payload")).await, "");

    // Replay without the token: refused, and the page says so; the letter stays pending.
    b.eval(&format!(
        "document.querySelector('{row} input[type=checkbox]').click()"
    ))
    .await;
    b.eval("document.querySelector('#replay').click()").await;
    let refusal = b
        .wait_for("the refusal", &Browser::text("#replay-result"), |v| {
            v.as_str().is_some_and(|s| s.starts_with("Refused"))
        })
        .await;
    assert!(
        refusal.as_str().unwrap().contains("401")
            && refusal.as_str().unwrap().contains("admin_token"),
        "{refusal}"
    );
    b.screenshot("console-refused").await;
    let (_, listed) = get(&addr, "/ui/api/dead-letters?status=pending");
    assert!(listed.contains(&position), "{listed}");

    // With the token: the letter opens with its payload and metadata.
    b.eval(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('#token-form').requestSubmit()",
        json!(TOKEN)
    ))
    .await;
    b.wait_for(
        "the payload of the dead letter",
        &Browser::text("#letter-payload"),
        |v| v.as_str().is_some_and(|s| s.contains("\"poison\": true")),
    )
    .await;
    let meta = b.eval(&Browser::text("#letter-meta")).await;
    assert!(
        meta.as_str().unwrap().contains("reject: order 2 is poison"),
        "metadata: {meta}"
    );
    b.screenshot("console-dead-letter").await;

    // Replayed with the token; the route takes the copy (dead-letters it again: it is still
    // poison) and the list shows the result.
    b.eval("document.querySelector('#replay').click()").await;
    let done = b
        .wait_for(
            "the replay's outcome",
            &Browser::text("#replay-result"),
            |v| {
                v.as_str().is_some_and(|s| {
                    s.starts_with("Replayed")
                        || s.starts_with("Refused")
                        || s.starts_with("Replay failed")
                })
            },
        )
        .await;
    assert!(
        done.as_str().unwrap().starts_with("Replayed 1 "),
        "{done}\n{}",
        run_logs(dir.path(), 1)
    );
    b.wait_for(
        "the replayed letter's result",
        &format!(
            "(document.querySelector('#dead-letters tr[data-position={}] td.status') || {{textContent: ''}}).textContent",
            json!(position)
        ),
        |v| v == "failed",
    )
    .await;
    b.wait_for(
        "the replayed copy received",
        &Browser::text(received),
        |v| v == "24",
    )
    .await;
    b.screenshot("console-replayed").await;

    // A refused reload is listed with its reason.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("handler = \"chaos\"", "handler = \"missing\""),
    )
    .unwrap();
    let (code, body) =
        lockgate::telemetry::http_request(&addr, "POST", "/reload", Some(TOKEN)).unwrap();
    assert_eq!(code, 422, "{body}");
    b.wait_for("the refused reload", &Browser::text("#reloads"), |v| {
        v.as_str()
            .is_some_and(|s| s.starts_with("refused") && s.contains("missing"))
    })
    .await;

    // Phone width: nothing wider than the screen.
    b.viewport(390, 844, true).await;
    b.wait_for(
        "no horizontal overflow at 390 px",
        "document.documentElement.scrollWidth <= window.innerWidth",
        |v| v == true,
    )
    .await;
    b.screenshot("console-phone").await;

    // Nothing was requested from anywhere but the admin endpoint, and /ui forbids it.
    let requested = b.requested();
    assert!(requested.iter().any(|u| u.ends_with("/ui/api/status")));
    let foreign: Vec<&String> = requested
        .iter()
        .filter(|u| !u.starts_with(&format!("{base}/")))
        .collect();
    assert!(foreign.is_empty(), "external requests: {foreign:?}");
    let csp = b
        .events
        .iter()
        .find(|e| {
            e["method"] == "Network.responseReceived"
                && e["params"]["response"]["url"] == format!("{base}/ui")
        })
        .map(|e| e["params"]["response"]["headers"].clone())
        .unwrap();
    let csp = csp
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-security-policy"))
        .map(|(_, v)| v.as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(csp.contains("default-src 'self'"), "CSP: {csp:?}");
    drop(b);
    stop_run(&mut run, dir.path(), 1);
    eprintln!(
        "console test: page loaded in {load_ms:.0} ms; screenshots in {}; {:?} in all",
        screenshot_dir().display(),
        started.elapsed()
    );
}
