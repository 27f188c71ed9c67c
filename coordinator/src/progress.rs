//! Progress display: a bar on an interactive terminal, periodic log lines otherwise.

use crate::run::{ProgressDisplay, PROGRESS_LOG_PERIOD};
use crate::scheduler::Progress;
use crate::service::Shared;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct ProgressReporter {
    display: ProgressDisplay,
    bar: Option<ProgressBar>,
    last_log: Mutex<Instant>,
    /// The finished grid has been logged (once).
    logged_finish: AtomicBool,
    shared: Arc<Shared>,
}

impl ProgressReporter {
    pub fn new(display: ProgressDisplay, shared: Arc<Shared>) -> ProgressReporter {
        let bar = (display == ProgressDisplay::Bar).then(|| {
            let b = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
            ) {
                b.set_style(style);
            }
            b
        });
        ProgressReporter {
            display,
            bar,
            last_log: Mutex::new(Instant::now()),
            logged_finish: AtomicBool::new(false),
            shared,
        }
    }

    pub fn update(&self, p: &Progress) {
        let finished = p.done + p.failed;
        match self.display {
            ProgressDisplay::Bar => {
                if let Some(b) = &self.bar {
                    b.set_length(p.total);
                    b.set_position(finished);
                    b.set_message(format!(
                        "running {} failed {} agents {}",
                        p.running, p.failed, p.agents_alive
                    ));
                }
            }
            ProgressDisplay::Log => {
                let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
                // The moment the grid finishes is logged at once, but only once: a long-lived
                // coordinator (--keep-serving) keeps ticking after it, every 250 ms.
                let just_finished = p.finished && !self.logged_finish.swap(true, Ordering::Relaxed);
                if (!p.finished && last.elapsed() >= PROGRESS_LOG_PERIOD) || just_finished {
                    *last = Instant::now();
                    tracing::info!(
                        run = %self.shared.run_id,
                        done = p.done,
                        failed = p.failed,
                        running = p.running,
                        pending = p.pending,
                        total = p.total,
                        agents = p.agents_alive,
                        "progress"
                    );
                }
            }
            ProgressDisplay::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
