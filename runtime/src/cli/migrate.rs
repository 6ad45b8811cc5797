//! `lockgate migrate`: creates or upgrades the schema of the config's PostgreSQL stores ahead of
//! a deploy (`lockgate run` does the same on first use).

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use lockgate::config::{Config, StoreKind};
use lockgate::state::{POSTGRES_SCHEMA_VERSION, PostgresStore, RedisStore};

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    config: super::ConfigPath,

    /// Only this store (default: every store in the config).
    #[arg(long, value_name = "NAME")]
    store: Option<String>,
}

pub fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let file = args.config.path();
    let config = match Config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if let Some(name) = &args.store
        && !config.stores.contains_key(name)
    {
        let known: Vec<&str> = config.stores.keys().map(String::as_str).collect();
        eprintln!(
            "{}: no [stores.{name}] table (defined: {})",
            file.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    if config.stores.is_empty() {
        outln!(
            "{}: no [stores.<name>] tables; the embedded store needs no migration",
            file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut failed = false;
    for (name, store) in &config.stores {
        if args.store.as_ref().is_some_and(|only| only != name) {
            continue;
        }
        let url = match store.url() {
            Ok(u) => u,
            Err(e) => {
                // The error names the config file, the field and the variable or file.
                eprintln!("{e}");
                failed = true;
                continue;
            }
        };
        let result = runtime.block_on(async {
            match &store.kind {
                StoreKind::Postgres { schema, .. } => {
                    let pg = PostgresStore::new(&url, schema, 1)?;
                    let before = pg.migrate().await?;
                    Ok(if before == POSTGRES_SCHEMA_VERSION {
                        format!("schema {schema} is at version {before}, the newest; nothing to do")
                    } else {
                        format!(
                            "schema {schema} migrated from version {before} to {POSTGRES_SCHEMA_VERSION}"
                        )
                    })
                }
                StoreKind::Redis { prefix } => {
                    RedisStore::new(&url, prefix)?.ping().await?;
                    Ok("redis needs no schema; the server answers".to_owned())
                }
            }
        });
        match result {
            Ok(done) => outln!("stores.{name}: {done}"),
            Err(e) => {
                let e: lockgate::state::StateError = e;
                eprintln!("stores.{name}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}
