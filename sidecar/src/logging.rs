//! Logs to the console and to a file (`LOG_FILE`, `app.log` by default), as the
//! seed's Python version did with `logging`.

use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. Keep the guard alive until exit: dropping it
/// flushes the file writer.
pub fn init(level: &str, file: &str) -> Result<WorkerGuard, String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("LOG_LEVEL is invalid: {e}"))?;
    let path = Path::new(file);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| format!("LOG_FILE is invalid: {file:?} has no file name"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("LOG_FILE is invalid: cannot create {dir:?}: {e}"))?;
    let (writer, guard) = tracing_appender::non_blocking(tracing_appender::rolling::never(dir, name));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())))
        .with(fmt::layer().with_ansi(false).with_writer(writer))
        .try_init()
        .map_err(|e| format!("logging already initialised: {e}"))?;
    Ok(guard)
}
