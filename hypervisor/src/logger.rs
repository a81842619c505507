//! The one logging path: a `log::Log` that prefixes every line with the CPU number and level,
//! and serialises CPUs on one console.
//!
//! It owns the console lock. It never blocks forever in an emergency: a panic or an exception
//! report takes the console after a bounded wait even if another CPU (or this one, interrupted
//! mid-line) holds it.

use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;

/// Where log lines go: the arch code's console, or a buffer in tests. Callers are serialised
/// by the logger's lock.
pub trait Console: Sync {
    fn write_str(&self, s: &str);
}

struct Out(&'static dyn Console);

impl Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.write_str(s);
        Ok(())
    }
}

const NO_OWNER: usize = usize::MAX;
/// Polls of a held console before an emergency writer takes it anyway.
const EMERGENCY_SPINS: u32 = 1 << 22;

pub struct Logger {
    sink: Mutex<Option<&'static dyn Console>>,
    /// Who has a line open on the console (streamed output not yet ended by a newline): a tag
    /// of [`Logger::raw_part`]'s caller, 0 for nobody. Changed only under `sink`'s lock.
    open: AtomicUsize,
    /// How much of the open line is on the console. Changed only under `sink`'s lock.
    shown: AtomicUsize,
    /// The CPU that holds `sink`'s lock, so a CPU that faults while printing is not deadlocked.
    owner: AtomicUsize,
    cpu_id: fn() -> usize,
}

impl Logger {
    pub const fn new(cpu_id: fn() -> usize) -> Self {
        Logger {
            sink: Mutex::new(None),
            open: AtomicUsize::new(0),
            shown: AtomicUsize::new(0),
            owner: AtomicUsize::new(NO_OWNER),
            cpu_id,
        }
    }

    /// Installs (or replaces) the console.
    pub fn set_sink(&self, sink: &'static dyn Console) {
        *self.sink.lock() = Some(sink);
    }

    fn write_line(&self, args: core::fmt::Arguments<'_>, level: &str) {
        let cpu = (self.cpu_id)();
        let guard = self.sink.lock();
        self.owner.store(cpu, Ordering::Relaxed);
        if let Some(out) = *guard {
            self.close_open(out);
            let _ = writeln!(Out(out), "[cpu{cpu} {level:<5}] {args}");
        }
        self.owner.store(NO_OWNER, Ordering::Relaxed);
    }

    /// Writes a line as it is, without CPU or level (a guest's console output).
    pub fn raw_line(&self, args: core::fmt::Arguments<'_>) {
        let cpu = (self.cpu_id)();
        let guard = self.sink.lock();
        self.owner.store(cpu, Ordering::Relaxed);
        if let Some(out) = *guard {
            self.close_open(out);
            let _ = writeln!(Out(out), "{args}");
        }
        self.owner.store(NO_OWNER, Ordering::Relaxed);
    }

    /// Ends a streamed line someone left open, so the next line starts on its own.
    fn close_open(&self, out: &'static dyn Console) {
        if self.open.swap(0, Ordering::Relaxed) != 0 {
            out.write_str("\n");
        }
    }

    /// Streams the line of the writer tagged `tag` (not 0) as it grows: `line` is all of it
    /// so far (the writer keeps it), `ended` says its newline came. Only what is new is written,
    /// after `[prefix] ` on a fresh line; when anything else was printed meanwhile (which ends
    /// the open line first), the line is written again whole, so every line a writer finishes
    /// stands whole on the console's line where it ends, whoever printed in its middle.
    /// For the guest whose console has the input focus: a shell's prompt shows before its
    /// newline. Bytes outside ASCII become `?`.
    pub fn raw_part(&self, tag: usize, prefix: &str, line: &[u8], ended: bool) {
        let cpu = (self.cpu_id)();
        let guard = self.sink.lock();
        self.owner.store(cpu, Ordering::Relaxed);
        if let Some(out) = *guard {
            let shown = self.shown.load(Ordering::Relaxed);
            let new = if self.open.load(Ordering::Relaxed) == tag && shown <= line.len() {
                &line[shown..]
            } else {
                self.close_open(out);
                let _ = write!(Out(out), "[{prefix}] ");
                line
            };
            for &b in new {
                // ASCII passes as it is, control characters too: the user's terminal runs the
                // guest's line editing (backspace, escape sequences).
                let c = if b.is_ascii() && b != 0 && b != b'\n' { b } else { b'?' };
                let mut one = [0u8; 4];
                out.write_str(char::from(c).encode_utf8(&mut one));
            }
            if ended {
                out.write_str("\n");
                self.open.store(0, Ordering::Relaxed);
            } else {
                self.open.store(tag, Ordering::Relaxed);
                self.shown.store(line.len(), Ordering::Relaxed);
            }
        }
        self.owner.store(NO_OWNER, Ordering::Relaxed);
    }

    /// Writes a line on the panic/exception path: waits a bounded time for the console, then
    /// takes it even if held (better a garbled line than a silent hang).
    pub fn emergency(&self, args: core::fmt::Arguments<'_>) {
        let cpu = (self.cpu_id)();
        let mut spins = 0u32;
        let guard = loop {
            if let Some(g) = self.sink.try_lock() {
                break g;
            }
            spins += 1;
            if self.owner.load(Ordering::Relaxed) == cpu || spins >= EMERGENCY_SPINS {
                // SAFETY: the holder is this CPU, interrupted mid-line and never resuming, or a
                // CPU that has not released the console for a very long time; writing over it
                // can garble text but not memory: the sink is still a valid writer.
                unsafe { self.sink.force_unlock() };
            }
            core::hint::spin_loop();
        };
        self.owner.store(cpu, Ordering::Relaxed);
        if let Some(out) = *guard {
            self.close_open(out);
            let _ = writeln!(Out(out), "[cpu{cpu} FATAL] {args}");
        }
        self.owner.store(NO_OWNER, Ordering::Relaxed);
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            self.write_line(*record.args(), record.level().as_str());
        }
    }

    fn flush(&self) {}
}

/// The level a `loglevel=` word in the kernel command line asks for: a name (`off`, `error`,
/// `warn`, `info`, `debug`, `trace`) or a Linux console level number (0-8).
pub fn level_from_bootargs(bootargs: &str) -> Option<LevelFilter> {
    let value = bootargs.split_ascii_whitespace().filter_map(|w| w.strip_prefix("loglevel=")).next_back()?;
    Some(match value {
        "off" => LevelFilter::Off,
        "error" | "0" | "1" | "2" | "3" => LevelFilter::Error,
        "warn" | "4" => LevelFilter::Warn,
        "info" | "5" | "6" => LevelFilter::Info,
        "debug" | "7" => LevelFilter::Debug,
        "trace" | "8" => LevelFilter::Trace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<StdMutex<String>>);
    impl Console for Buf {
        fn write_str(&self, s: &str) {
            self.0.lock().unwrap().push_str(s);
        }
    }

    fn logger_with_buf() -> (&'static Logger, Buf) {
        let logger: &'static Logger = Box::leak(Box::new(Logger::new(|| 3)));
        let buf = Buf::default();
        logger.set_sink(Box::leak(Box::new(buf.clone())));
        (logger, buf)
    }

    #[test]
    fn lines_carry_cpu_and_level() {
        let (logger, buf) = logger_with_buf();
        logger.write_line(format_args!("hello {}", 42), "INFO");
        assert_eq!(buf.0.lock().unwrap().as_str(), "[cpu3 INFO ] hello 42\n");
    }

    #[test]
    fn emergency_takes_a_console_held_by_this_cpu() {
        let (logger, buf) = logger_with_buf();
        let held = logger.sink.lock();
        logger.owner.store(3, Ordering::Relaxed);
        logger.emergency(format_args!("boom"));
        core::mem::forget(held);
        assert!(buf.0.lock().unwrap().ends_with("[cpu3 FATAL] boom\n"));
    }

    #[test]
    fn streamed_lines_stand_whole_where_they_end_whoever_prints_in_their_middle() {
        let (logger, buf) = logger_with_buf();
        let stream = |tag, prefix, text: &[u8]| {
            // As the UART hands them out: the line so far at each byte, the whole at its end.
            let mut line = Vec::new();
            for &b in text {
                match b {
                    b'\n' => logger.raw_part(tag, prefix, &core::mem::take(&mut line), true),
                    _ => {
                        line.push(b);
                        logger.raw_part(tag, prefix, &line, false);
                    }
                }
            }
        };
        stream(7, "linux", b"/ # ls\n/ # ");
        logger.raw_line(format_args!("[stress] a whole line"));
        stream(7, "linux", b"/ # x");
        stream(9, "other", b"y\n\n");
        logger.raw_part(7, "linux", b"/ # xz", true);
        assert_eq!(
            buf.0.lock().unwrap().as_str(),
            "[linux] / # ls\n[linux] / # \n[stress] a whole line\n[linux] / # x\n[other] y\n[other] \n\
             [linux] / # xz\n"
        );
    }

    #[test]
    fn loglevel_names_and_numbers() {
        assert_eq!(level_from_bootargs("console=ttyAMA0 loglevel=debug"), Some(LevelFilter::Debug));
        assert_eq!(level_from_bootargs("loglevel=4"), Some(LevelFilter::Warn));
        assert_eq!(level_from_bootargs("loglevel=info loglevel=trace"), Some(LevelFilter::Trace));
        assert_eq!(level_from_bootargs("quiet"), None);
        assert_eq!(level_from_bootargs("loglevel=loud"), None);
        assert_eq!(level_from_bootargs("xloglevel=debug"), None);
    }
}
