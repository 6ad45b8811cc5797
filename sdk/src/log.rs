//! Structured logging, attributed by the host to the route, handler and message.
//!
//! The host bounds the number and size of records per invocation; records beyond the bound are
//! counted and dropped. The [`trace!`](crate::trace), [`debug!`](crate::debug),
//! [`info!`](crate::info), [`warn!`](crate::warn) and [`error!`](crate::error) macros take
//! `format!` arguments.

use std::fmt;

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the handler coped with.
    Warn,
    /// A failure.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Trace => "TRACE",
            Self::Debug => "DEBUG",
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        })
    }
}

/// Records `message` at `level`.
pub fn log(level: Level, message: impl AsRef<str>) {
    crate::host::log(level, message.as_ref());
}

/// Records `message` at [`Level::Trace`].
pub fn trace(message: impl AsRef<str>) {
    log(Level::Trace, message);
}

/// Records `message` at [`Level::Debug`].
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message);
}

/// Records `message` at [`Level::Info`].
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message);
}

/// Records `message` at [`Level::Warn`].
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message);
}

/// Records `message` at [`Level::Error`].
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message);
}

/// Logs a `format!`-style message at trace level: `lockgate_sdk::trace!("x = {}", x)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Trace, ::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at debug level: `lockgate_sdk::debug!("x = {}", x)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Debug, ::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at info level: `lockgate_sdk::info!("x = {}", x)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Info, ::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at warn level: `lockgate_sdk::warn!("x = {}", x)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Warn, ::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at error level: `lockgate_sdk::error!("x = {}", x)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Error, ::std::format!($($arg)+))
    };
}
