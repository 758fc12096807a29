//! Progress bars on stderr (hidden automatically when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(label: &str, total: usize) -> Self {
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        b.set_prefix(label.to_string());
        Bar(b)
    }
    pub fn update(&mut self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
    pub fn finish(self) {
        self.0.finish_and_clear();
    }
}
