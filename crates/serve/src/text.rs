//! Generated tokens to text as they come: whole characters only (a character split across
//! byte tokens waits for its last byte), cut at the first stop string, and text that could
//! still become a stop string held back until it cannot.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// The text of one completion so far.
pub struct TextStream {
    tok: Arc<Tokenizer>,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the text already handed out.
    shown: usize,
    /// Where a stop string was found: the text ends there.
    stopped: bool,
}

impl TextStream {
    pub fn new(tok: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        TextStream { tok, stops, ids: Vec::new(), shown: 0, stopped: false }
    }

    /// Adds a token; returns the text that is now final (maybe empty). After a stop string
    /// [`TextStream::stopped`] is true and nothing more comes.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true).unwrap_or_default();
        // A trailing replacement character is a character whose bytes have not all come.
        let whole = text.trim_end_matches('\u{fffd}');
        if let Some(at) = self.first_stop(&text) {
            self.stopped = true;
            return self.take(&text, at.max(self.shown));
        }
        let hold = self.stops.iter().map(|s| partial_suffix(whole, s)).max().unwrap_or(0);
        let mut end = whole.len() - hold;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.take(&text, end)
    }

    /// The rest at the end of the completion (held-back text that did not become a stop
    /// string; characters never completed are dropped).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.tok.decode(&self.ids, true).unwrap_or_default();
        let end = text.trim_end_matches('\u{fffd}').len();
        self.take(&text, end)
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn first_stop(&self, text: &str) -> Option<usize> {
        // A stop string may begin in text already shown only as far as it was held back.
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.shown {
            return String::new();
        }
        let out = text[self.shown..end].to_string();
        self.shown = end;
        out
    }
}

/// The longest proper prefix of `stop` that `text` ends with (bytes).
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_stop_strings_are_held_back() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        assert_eq!(partial_suffix("ab\n", "\n\n"), 1);
    }
}
