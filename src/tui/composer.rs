//! The message box: the text being typed with its cursor, the messages sent (recalled with
//! Up and Down), and the slash commands that complete what is typed.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::commands::{SlashCommand, COMMANDS};

/// The message being typed and the ones sent before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Composer {
    text: String,
    /// Byte index in `text`, at a char boundary.
    cursor: usize,
    /// Messages sent, oldest first.
    sent: Vec<String>,
    /// Which sent message is shown, while recalling.
    recall: Option<usize>,
}

fn prev_boundary(s: &str, i: usize) -> usize {
    s[..i].char_indices().next_back().map_or(0, |(j, _)| j)
}

fn next_boundary(s: &str, i: usize) -> usize {
    s[i..].chars().next().map_or(i, |c| i + c.len_utf8())
}

impl Composer {
    /// The text typed so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The cursor's byte index in the text.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The messages sent, oldest first.
    pub fn sent(&self) -> &[String] {
        &self.sent
    }

    /// The cursor's line (from 0) and the text before it on that line.
    pub fn cursor_line(&self) -> (usize, &str) {
        let before = &self.text[..self.cursor];
        let line = before.matches('\n').count();
        (line, before.rsplit('\n').next().unwrap_or_default())
    }

    /// Inserts `text` at the cursor (a paste's line endings made `\n`).
    pub fn insert(&mut self, text: &str) {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        self.text.insert_str(self.cursor, &text);
        self.cursor += text.len();
        self.recall = None;
    }

    /// Replaces the text, with the cursor at its end.
    pub fn set(&mut self, text: String) {
        self.text = text;
        self.cursor = self.text.len();
    }

    /// Takes the message to send (trailing whitespace trimmed) and keeps it for recall;
    /// `None`, leaving the text, when it is blank.
    pub fn take(&mut self) -> Option<String> {
        let text = self.text.trim_end().to_string();
        if text.trim().is_empty() {
            return None;
        }
        self.text.clear();
        self.cursor = 0;
        self.recall = None;
        self.sent.push(text.clone());
        Some(text)
    }

    /// Edits the text for an editing key; false when the key is not one.
    pub fn edit(&mut self, key: KeyEvent) -> bool {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Enter if alt => self.insert("\n"),
            KeyCode::Char('j') if ctrl => self.insert("\n"),
            KeyCode::Char(c) if !ctrl => self.insert(c.encode_utf8(&mut [0; 4])),
            KeyCode::Backspace if self.cursor > 0 => {
                let start = prev_boundary(&self.text, self.cursor);
                self.text.replace_range(start..self.cursor, "");
                self.cursor = start;
            }
            KeyCode::Delete if self.cursor < self.text.len() => {
                let end = next_boundary(&self.text, self.cursor);
                self.text.replace_range(self.cursor..end, "");
            }
            KeyCode::Left => self.cursor = prev_boundary(&self.text, self.cursor),
            KeyCode::Right => self.cursor = next_boundary(&self.text, self.cursor),
            KeyCode::Home => {
                self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1)
            }
            KeyCode::End => {
                self.cursor = self.text[self.cursor..]
                    .find('\n')
                    .map_or(self.text.len(), |i| self.cursor + i)
            }
            KeyCode::Up if self.text.is_empty() || self.recall.is_some() => self.recall(-1),
            KeyCode::Down if self.recall.is_some() => self.recall(1),
            _ => return false,
        }
        true
    }

    /// Shows the sent message `step` away from the one shown (Up: -1), or an empty box past
    /// the newest.
    fn recall(&mut self, step: i32) {
        if self.sent.is_empty() {
            return;
        }
        let last = self.sent.len() - 1;
        let next = match (self.recall, step < 0) {
            (None, true) => Some(last),
            (None, false) => None,
            (Some(0), true) => Some(0),
            (Some(i), true) => Some(i - 1),
            (Some(i), false) if i >= last => None,
            (Some(i), false) => Some(i + 1),
        };
        self.recall = next;
        self.text = next.map(|i| self.sent[i].clone()).unwrap_or_default();
        self.cursor = self.text.len();
    }

    /// The slash commands that match what is typed, when the text is a command name.
    pub fn completions(&self) -> Vec<&'static SlashCommand> {
        if !self.text.starts_with('/') || self.text.contains(char::is_whitespace) {
            return Vec::new();
        }
        COMMANDS
            .iter()
            .filter(|command| command.name.starts_with(self.text.as_str()))
            .collect()
    }

    /// Completes the text to the first matching command; false when none matches.
    pub fn complete(&mut self) -> bool {
        let Some(command) = self.completions().first().copied() else {
            return false;
        };
        self.set(format!("{} ", command.name));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> Composer {
        let mut composer = Composer::default();
        composer.insert(text);
        composer
    }

    #[test]
    fn editing_keys_move_by_characters_and_lines() {
        let mut composer = typed("añb\nxy");
        assert!(composer.edit(KeyEvent::from(KeyCode::Home)));
        assert_eq!(composer.cursor_line(), (1, ""));
        composer.edit(KeyEvent::from(KeyCode::Up));
        // Up in a typed message is not a recall (nothing was sent).
        assert_eq!(composer.text(), "añb\nxy");
        for _ in 0..2 {
            composer.edit(KeyEvent::from(KeyCode::Left));
        }
        assert_eq!(composer.cursor_line(), (0, "añ"));
        composer.edit(KeyEvent::from(KeyCode::Backspace));
        assert_eq!(composer.text(), "ab\nxy");
        composer.edit(KeyEvent::from(KeyCode::Delete));
        assert_eq!(composer.text(), "a\nxy");
        composer.edit(KeyEvent::from(KeyCode::End));
        assert_eq!(composer.cursor_line(), (0, "a"));
        assert!(!composer.edit(KeyEvent::from(KeyCode::F(5))));
    }

    #[test]
    fn pasted_line_endings_become_newlines_and_blank_text_is_not_taken() {
        let mut composer = typed("one\r\ntwo\rthree");
        assert_eq!(composer.text(), "one\ntwo\nthree");
        assert_eq!(composer.take().as_deref(), Some("one\ntwo\nthree"));
        composer.insert("  \n ");
        assert_eq!(composer.take(), None);
        assert_eq!(composer.text(), "  \n ");
        assert_eq!(composer.sent(), ["one\ntwo\nthree"]);
    }

    #[test]
    fn completion_lists_matching_commands_until_a_space() {
        let composer = typed("/d");
        let names: Vec<_> = composer.completions().iter().map(|c| c.name).collect();
        assert_eq!(names, ["/drop", "/diff"]);
        assert!(typed("/drop x").completions().is_empty());
        assert!(typed("hello").completions().is_empty());
        let mut composer = typed("/lo");
        assert!(composer.complete());
        assert_eq!(composer.text(), "/loops ");
    }
}
