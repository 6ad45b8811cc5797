//! The Grafana dashboard (`deploy/grafana/lockgate.json`) and the alert rules
//! (`deploy/prometheus/lockgate-alerts.yml`) against a real Prometheus scraping a real
//! `lockgate run` on Kafka (docs/operate/dashboards-and-alerts.md): every PromQL expression
//! parses, every dashboard query returns series of the route that processed messages, and the
//! breaker, dead-letter and reload alerts fire for a route made to trip them while the others
//! stay quiet.
//!
//! Needs the test Kafka broker and Prometheus (`scripts/brokers.sh start all`). About 10 s.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use lockgate_tests::admin::{admin_addr, get, value, wait_readyz};
use lockgate_tests::kafka::{bootstrap, create_topics, produce, runtime, unique};
use lockgate_tests::prometheus::{self, DEADLINE, Rules, Target, query, series, wait};
use lockgate_tests::{guest, run_logs, start_run, workspace_root};
use serde_json::Value;

const ROUTE: &str = "orders";
const HANDLER: &str = "probe";
/// Rejected (not JSON): dead-lettered at once, more than the alert's 10 in 5 minutes.
const POISON: u64 = 15;
/// Fetch Prometheus's own health page: the HTTP dependency of the route.
const GOOD: u64 = 30;
/// Ask to be retried on every attempt: the breaker opens after 3 in a row.
const FAILING: u64 = 6;

/// The route: Kafka `input` (3 partitions) through the http-probe guest, which GETs the URL in
/// each message (Prometheus's `/-/healthy`, the one host it is granted) and publishes the
/// answer to `out`; retries, a breaker that stays open for 10 minutes once 3 calls in a row
/// failed, and a Kafka DLQ.
fn write_config(dir: &Path, names: &Names, prometheus: &str) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"
shutdown_grace_ms = 2000
admin = "127.0.0.1:0"
watch = "off"

[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
consumer_properties = {{ "session.timeout.ms" = 6000, "max.poll.interval.ms" = 10000 }}

[handlers.{HANDLER}]
module = "{module}"
config = {{ target = "{out}" }}

[handlers.{HANDLER}.http]
allowed_hosts = ["http://{prometheus}"]
timeout_ms = 5000

[routes.{ROUTE}]
handler = "{HANDLER}"
source = {{ broker = "kafka", topic = "{input}", group = "{group}" }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
retry = {{ max_attempts = 3, initial_backoff_ms = 10, jitter = "none" }}
circuit_breaker = {{ consecutive_failures = 3, open_ms = 600000 }}
"#,
            bootstrap = bootstrap(),
            module = guest("http-probe").display(),
            out = names.out,
            input = names.input,
            group = names.group,
            dlq = names.dlq,
        ),
    )
    .unwrap();
    config
}

struct Names {
    input: String,
    out: String,
    dlq: String,
    group: String,
}

/// The value of `name{route="orders"}` on the admin endpoint's `/metrics` (0 before the route
/// reports it).
fn metric(addr: &str, name: &str) -> f64 {
    value(&get(addr, "/metrics").1, name, ROUTE).unwrap_or(0.0)
}

/// Waits until run 1 reports `name` at `want` or more on its own `/metrics`.
fn wait_metric(child: &mut lockgate_tests::Proc, dir: &Path, addr: &str, name: &str, want: f64) {
    let started = Instant::now();
    loop {
        let got = metric(addr, name);
        if got >= want {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "lockgate run exited\n{}",
            run_logs(dir, 1)
        );
        assert!(
            started.elapsed() < DEADLINE,
            "{name} is {got}, not {want}, after {DEADLINE:?}\n{}",
            run_logs(dir, 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A value for a Grafana template variable in a regex matcher (`=~"$var"`), as Grafana formats
/// one: regex metacharacters escaped, the backslash doubled for the PromQL string.
fn regex_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if ".+*?^$()[]{}|\\".contains(c) {
                format!("\\\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `expr` with the dashboard's template variables and Grafana's built-in intervals replaced
/// (5m: everything the test did is within the last 5 minutes); panics if a `$` is left.
fn substitute(expr: &str, vars: &[(&str, String)]) -> String {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    for (name, v) in vars {
        out = out
            .replace(&format!("${{{name}}}"), v)
            .replace(&format!("${name}"), v);
    }
    assert!(!out.contains('$'), "a variable is left in {out}");
    out
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut all = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        all.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            all.extend(nested.iter().cloned());
        }
    }
    all
}

/// The `lockgate_*` metric names an expression reads (histogram series without their suffix).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("lockgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .unwrap_or(name);
        names.insert(name.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The rules file with every `for:` cut to 0s, so its alerts fire at the first evaluation that
/// finds their condition true (the real durations are minutes).
fn without_for(rules: &str) -> String {
    let mut changed = 0;
    let text: Vec<String> = rules
        .lines()
        .map(|l| {
            let trimmed = l.trim_start();
            if trimmed.starts_with("for:") {
                changed += 1;
                format!("{}for: 0s", &l[..l.len() - trimmed.len()])
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(changed >= 4, "expected the alerts' for: lines in\n{rules}");
    text.join("\n") + "\n"
}

/// `promtool check rules FILE` (promtool comes with the prometheus package).
fn promtool_check(file: &Path) {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(file)
        .output()
        .expect(
            "promtool (apt package prometheus; scripts/brokers.sh start prometheus installs it)",
        );
    assert!(
        out.status.success(),
        "promtool check rules {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The anchors (`<a id="...">`) of a Markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .split("<a id=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// State of `alert` for the series of `job` in a group list from `/api/v1/rules` (`inactive`
/// when no alert of it has that job).
fn alert_state(groups: &[Value], alert: &str, job: &str) -> String {
    for rule in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
    {
        if rule["name"] != alert {
            continue;
        }
        for a in rule["alerts"].as_array().cloned().unwrap_or_default() {
            if a["labels"]["job"] == job {
                return a["state"].as_str().unwrap_or("?").to_owned();
            }
        }
    }
    "inactive".to_owned()
}

#[test]
fn dashboard_queries_return_series_and_alerts_fire_on_a_real_prometheus() {
    let started = Instant::now();
    let prom = prometheus::addr();
    let prom_dir = prometheus::dir(&prom);
    let root = workspace_root();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/lockgate.json")).unwrap(),
    )
    .expect("deploy/grafana/lockgate.json is JSON");
    let rules_file = root.join("deploy/prometheus/lockgate-alerts.yml");
    let rules_text = std::fs::read_to_string(&rules_file).unwrap();
    promtool_check(&rules_file);
    let fast_text = without_for(&rules_text);

    let dir = tempfile::tempdir().unwrap();
    let fast_file = dir.path().join("fast.yml");
    std::fs::write(&fast_file, &fast_text).unwrap();
    promtool_check(&fast_file);

    // Importable: every query reads the data source variable.
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus data source variable"
    );

    let names = Names {
        input: unique("dash-in"),
        out: unique("dash-out"),
        dlq: unique("dash-dlq"),
        group: unique("dash-group"),
    };
    let rt = runtime();
    create_topics(&rt, &[(&names.input, 3), (&names.out, 1), (&names.dlq, 1)]);
    let config = write_config(dir.path(), &names, &prom);
    let mut child = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let admin = admin_addr(&mut child, dir.path(), 1);
    wait_readyz(&mut child, dir.path(), 1, &admin, DEADLINE, |code, _| {
        code == 200
    });

    // Only this test's series carry this job; rules loaded in a file of their own.
    let job = unique("dashboards");
    let _target = Target::register(&prom_dir, &job, &admin);
    let rules = Rules::load(
        &prom,
        &prom_dir,
        &[(&job, &rules_text), (&format!("{job}-fast"), &fast_text)],
    );
    // Two scrapes before any message, so the counters' rise is inside the scraped history.
    wait("two scrapes of lockgate run", DEADLINE, || {
        let got = query(
            &prom,
            &format!("count_over_time(lockgate_messages_received_total{{job=\"{job}\"}}[5m])"),
        )?;
        let scrapes = got
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if scrapes >= 2.0 {
            Ok(())
        } else {
            Err(format!(
                "{scrapes} scrapes; up: {:?}",
                query(&prom, &format!("up{{job=\"{job}\"}}"))
            ))
        }
    });

    // Messages that succeed (with an HTTP call each) and poison that is dead-lettered.
    let url = format!("http://{prom}/-/healthy");
    let mut messages: Vec<(String, String)> = (0..GOOD)
        .map(|i| {
            (
                format!("k{i}"),
                serde_json::json!({"id": i, "url": url}).to_string(),
            )
        })
        .collect();
    messages.extend((0..POISON).map(|i| (format!("p{i}"), format!("not json {i}"))));
    produce(&rt, &names.input, &messages);
    wait_metric(
        &mut child,
        dir.path(),
        &admin,
        "lockgate_messages_succeeded_total",
        GOOD as f64,
    );
    wait_metric(
        &mut child,
        dir.path(),
        &admin,
        "lockgate_messages_dead_lettered_total",
        POISON as f64,
    );
    // Then calls that keep failing: retried, until the breaker opens and pauses the route.
    let failing: Vec<(String, String)> = (0..FAILING)
        .map(|i| {
            (
                format!("f{i}"),
                serde_json::json!({"id": 1000 + i, "url": url, "fail": "retry"}).to_string(),
            )
        })
        .collect();
    produce(&rt, &names.input, &failing);
    wait_metric(
        &mut child,
        dir.path(),
        &admin,
        "lockgate_breaker_state",
        1.0,
    );
    // And a reload that is refused: a config that does not parse.
    std::fs::write(&config, "this is not toml = [").unwrap();
    let (code, body) = lockgate::telemetry::http_request(&admin, "POST", "/reload", None).unwrap();
    assert_ne!(code, 200, "{body}");
    assert_eq!(lockgate_tests::admin::reloads(&admin), (0, 1));

    // The template variables list this run's values (Grafana's label_values(selector, label)).
    let mut values: Vec<(&str, String)> = Vec::new();
    for (name, want) in [
        ("job", job.clone()),
        ("instance", admin.clone()),
        ("route", ROUTE.to_owned()),
        ("handler", HANDLER.to_owned()),
    ] {
        let var = vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| {
            panic!("the dashboard has no variable {name}");
        });
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name}: not label_values(...): {q}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        assert_eq!(label.trim(), name, "{q}");
        // Scoped to this test's job (the others' runs are there too), then the earlier values.
        let selector = substitute(selector, &values);
        let selector = if selector.contains('{') {
            selector.replacen('{', &format!("{{job=\"{job}\", "), 1)
        } else {
            format!("{selector}{{job=\"{job}\"}}")
        };
        let found: BTreeSet<String> = series(&prom, &selector)
            .unwrap_or_else(|e| panic!("variable {name}: {selector}: {e}"))
            .iter()
            .filter_map(|s| s[name].as_str().map(str::to_owned))
            .collect();
        assert!(
            found.contains(&want),
            "variable {name} ({selector}): {found:?}, not {want}"
        );
        values.push((name, regex_value(&want)));
    }

    // Every dashboard query parses and returns series of the route (or, for the reloads,
    // of this process); each may need a few more scrapes (the lag refreshes every 5 s).
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        for t in panel["targets"].as_array().cloned().unwrap_or_default() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}: a target without the data source variable",
                panel["title"]
            );
            let expr = t["expr"].as_str().unwrap();
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                substitute(expr, &values),
            ));
        }
    }
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut read = BTreeSet::new();
    for (title, q) in &queries {
        read.extend(metric_names(q));
        wait(&format!("panel {title:?}: {q}"), DEADLINE, || {
            let result = query(&prom, q).unwrap_or_else(|e| panic!("panel {title:?}: {q}: {e}"));
            if result.is_empty() {
                return Err("no series".into());
            }
            for s in &result {
                if let Some(route) = s["metric"]["route"].as_str() {
                    assert_eq!(route, ROUTE, "panel {title:?}: {q}: {s}");
                }
            }
            Ok(())
        });
    }

    // Every rule Prometheus loaded from the real file: documented, and its expression parses
    // and reads metrics this process serves.
    let doc = std::fs::read_to_string(root.join("docs/operate/dashboards-and-alerts.md")).unwrap();
    let doc_anchors = anchors(&doc);
    let groups = prometheus::groups_of(&prom, rules.path(0));
    let loaded: Vec<Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let alerts: BTreeSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        alerts,
        BTreeSet::from([
            "LockgateBreakerOpen",
            "LockgateConsumerLagGrowing",
            "LockgateDeadLetterRate",
            "LockgateReloadRefused",
            "LockgateRouteNotReady",
        ]),
        "{groups:?}"
    );
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{rule}");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        let runbook = rule["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = runbook
            .split_once("docs/operate/dashboards-and-alerts.md#")
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("{name}: runbook_url {runbook} is not the runbook page"));
        assert!(
            doc_anchors.contains(anchor),
            "{name}: no <a id=\"{anchor}\"> in the runbook page"
        );
        let q = rule["query"].as_str().unwrap();
        query(&prom, q).unwrap_or_else(|e| panic!("{name}: {q}: {e}"));
        read.extend(metric_names(q));
    }
    for name in &read {
        let got = query(
            &prom,
            &format!("count({{__name__=~\"{name}(_bucket)?\", job=\"{job}\"}})"),
        )
        .unwrap();
        assert!(
            !got.is_empty(),
            "{name}, read by a query, is not served by lockgate run"
        );
    }

    // The copy with `for: 0s`: the breaker, dead-letter and reload alerts fire for this job,
    // the route (paused by the breaker is ready) is not reported as not ready, and a lag of a
    // few messages is not "growing".
    let firing = [
        "LockgateBreakerOpen",
        "LockgateDeadLetterRate",
        "LockgateReloadRefused",
    ];
    let fast = wait("the alerts to fire", DEADLINE, || {
        let groups = prometheus::groups_of(&prom, rules.path(1));
        let states: Vec<String> = firing
            .iter()
            .map(|a| alert_state(&groups, a, &job))
            .collect();
        if states.iter().all(|s| s == "firing") {
            Ok(groups)
        } else {
            Err(format!("{firing:?}: {states:?}"))
        }
    });
    for quiet in ["LockgateRouteNotReady", "LockgateConsumerLagGrowing"] {
        assert_eq!(
            alert_state(&fast, quiet, &job),
            "inactive",
            "{quiet}: {fast:?}"
        );
    }
    let alerts = prometheus::api(&prom, "/api/v1/alerts").unwrap();
    let ours: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["job"] == job.as_str() && a["state"] == "firing")
        .collect();
    for alert in ["LockgateBreakerOpen", "LockgateDeadLetterRate"] {
        assert!(
            ours.iter()
                .any(|a| a["labels"]["alertname"] == alert && a["labels"]["route"] == ROUTE),
            "{alert} not firing for route {ROUTE}: {ours:?}"
        );
    }
    eprintln!("dashboards: {:.1} s", started.elapsed().as_secs_f64());
}
