//! Function tools: which a request offers (when the template renders them), and the calls
//! a model writes back, in the Hermes form tool-calling templates train on.

use serde_json::{json, Value};

/// A function call the model wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

/// The function tools of a Chat Completions request (`{"type": "function", "function":
/// {...}}`) or a Responses request (`{"type": "function", "name", ...}`), in the form chat
/// templates read; other tool types are left out.
pub fn function_tools(body: &Value) -> Vec<Value> {
    let Some(tools) = body.get("tools").and_then(Value::as_array) else {
        return Vec::new();
    };
    tools
        .iter()
        .filter(|t| t["type"] == "function")
        .filter_map(|t| {
            if t["function"].is_object() {
                return Some(t.clone());
            }
            let name = t.get("name")?;
            Some(json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": t.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({})),
                },
            }))
        })
        .collect()
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Splits `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks out of an answer:
/// the text outside them and the calls, in order. A block that is not such JSON stays text;
/// a block left open at the end of the answer is read to the end.
pub fn split_tool_calls(answer: &str) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut rest = answer;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let (inner, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match parse_call(inner) {
            Some(call) => {
                text.push_str(&rest[..start]);
                calls.push(call);
            }
            None => text.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    text.push_str(rest);
    (text.trim().to_owned(), calls)
}

fn parse_call(inner: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".to_owned(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_split_out_of_the_answer() {
        let answer = "Let me look.\n<tool_call>\n{\"name\": \"shell\", \"arguments\": {\"cmd\": [\"ls\"]}}\n</tool_call>";
        let (text, calls) = split_tool_calls(answer);
        assert_eq!(text, "Let me look.");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "shell".into(),
                arguments: "{\"cmd\":[\"ls\"]}".into()
            }]
        );
        let (text, calls) = split_tool_calls("<tool_call>{\"name\": \"a\", \"arguments\": \"{}\"}");
        assert_eq!(
            (text.as_str(), calls.len()),
            ("", 1),
            "an unclosed last call"
        );
        let (text, calls) = split_tool_calls("x <tool_call>not json</tool_call> y");
        assert_eq!(
            (text.as_str(), calls.len()),
            ("x <tool_call>not json</tool_call> y", 0)
        );
    }

    #[test]
    fn both_apis_tool_shapes_become_the_templates() {
        let chat = json!({"tools": [{"type": "function", "function": {"name": "f"}}]});
        assert_eq!(
            function_tools(&chat),
            chat["tools"].as_array().unwrap().clone()
        );
        let responses = json!({"tools": [
            {"type": "function", "name": "g", "parameters": {"type": "object"}},
            {"type": "custom", "name": "apply_patch"},
            {"type": "web_search"},
        ]});
        let tools = function_tools(&responses);
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0]["function"]["name"], "g");
    }
}
