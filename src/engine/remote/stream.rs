//! A streamed chat completion: server-sent events split into data lines, and each chunk's
//! text, reasoning, finish reason and usage.

use serde_json::Value;

/// Splits a byte stream into the `data:` payloads of its server-sent events.
#[derive(Debug, Default)]
pub struct SseLines {
    pending: Vec<u8>,
}

impl SseLines {
    /// Takes more bytes; returns the data payloads of the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            // Comments (`:`), event names and ids carry nothing a chat client needs.
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.strip_prefix(' ').unwrap_or(data).to_owned());
            }
        }
        out
    }
}

/// What one chunk of a streamed chat completion says.
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    /// Answer text.
    pub content: Option<String>,
    /// Reasoning text (`reasoning_content`, or vLLM's newer `reasoning`).
    pub reasoning: Option<String>,
    /// Why the answer ended, on its last chunk.
    pub finish_reason: Option<String>,
    /// Usage: prompt tokens, completion tokens, cached prompt tokens.
    pub usage: Option<Usage>,
    /// An error the server reported in the stream.
    pub error: Option<String>,
    /// The loop count a plait server ran the answer with.
    pub loops: Option<usize>,
}

/// Token counts the server reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: Option<usize>,
    /// Answer tokens.
    pub completion: Option<usize>,
    /// Prompt tokens served from the server's cache.
    pub cached: Option<usize>,
}

fn count(value: &Value) -> Option<usize> {
    value.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn text(value: &Value) -> Option<String> {
    value.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

impl Chunk {
    /// Reads one chunk's JSON.
    pub fn parse(value: &Value) -> Self {
        let choice = &value["choices"][0];
        let delta = &choice["delta"];
        let usage = &value["usage"];
        // llama.cpp reports the cached prompt in its timings.
        let cached = count(&usage["prompt_tokens_details"]["cached_tokens"])
            .or_else(|| count(&value["timings"]["cache_n"]));
        let usage = (usage.is_object() || cached.is_some()).then(|| Usage {
            prompt: count(&usage["prompt_tokens"]),
            completion: count(&usage["completion_tokens"]),
            cached,
        });
        let error = value.get("error").map(|e| {
            e["message"]
                .as_str()
                .or_else(|| e.as_str())
                .unwrap_or("the server reported an error")
                .to_owned()
        });
        Self {
            content: text(&delta["content"]),
            reasoning: text(&delta["reasoning_content"]).or_else(|| text(&delta["reasoning"])),
            finish_reason: text(&choice["finish_reason"]),
            usage,
            error,
            loops: count(&value["plait"]["loops"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn data_lines_are_split_across_reads_and_other_lines_are_skipped() {
        let mut lines = SseLines::default();
        assert!(lines.push(b": keep-alive\n\ndata: {\"a\"").is_empty());
        assert_eq!(
            lines.push(b":1}\r\n\nevent: x\ndata:[DONE]\n"),
            ["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn chunks_carry_text_reasoning_finish_and_usage() {
        let chunk = Chunk::parse(&json!({
            "choices": [{"index": 0, "delta": {"reasoning": "hmm", "content": ""}, "finish_reason": null}]
        }));
        assert_eq!(chunk.reasoning.as_deref(), Some("hmm"));
        assert_eq!(chunk.content, None);
        let last = Chunk::parse(&json!({
            "choices": [],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 12}}
        }));
        assert_eq!(
            last.usage,
            Some(Usage {
                prompt: Some(30),
                completion: Some(5),
                cached: Some(12)
            })
        );
        let llama = Chunk::parse(&json!({
            "choices": [{"delta": {}, "finish_reason": "length"}],
            "timings": {"cache_n": 7}
        }));
        assert_eq!(llama.finish_reason.as_deref(), Some("length"));
        assert_eq!(llama.usage.and_then(|u| u.cached), Some(7));
        let failed = Chunk::parse(&json!({"error": {"message": "out of memory"}}));
        assert_eq!(failed.error.as_deref(), Some("out of memory"));
    }
}
