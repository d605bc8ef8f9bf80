//! Conversations as chat templates see them: OpenAI-style messages with a role, text content,
//! optional tool calls and a per-message training flag, plus the tools offered.
//!
//! Every data format (`messages`, `sharegpt`, `prompt_completion`, Alpaca records in chat form)
//! is normalised into a [`Conversation`] before rendering, so one renderer and one span finder
//! serve them all. Content given as a list of text parts is joined into one string here, the
//! way LLaMA-Factory and TRL hand it to text-only templates.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who speaks a message, under the names chat templates test for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// The person.
    User,
    /// The model: the only role whose turns are trained by the assistant policies.
    Assistant,
    /// A tool's result, answering an assistant's tool call.
    Tool,
}

impl Role {
    /// The name templates compare against (`message['role'] == 'assistant'`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The role an OpenAI-style `role` string names, if any.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// The text; `None` for an assistant message that only calls tools (OpenAI's `null`).
    pub content: Option<String>,
    /// OpenAI-style tool calls of an assistant message, handed to the template as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// Per-message training flag (`train`, or `loss_weight` 0/1): overrides the label policy
    /// for this message. `None` leaves it to the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
    /// Any other fields of the message (`name`, `tool_call_id`, `reasoning_content`, ...),
    /// handed to the template unchanged and in their order.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A plain text message.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(content.into()),
            tool_calls: None,
            train: None,
            extra: Map::new(),
        }
    }

    /// The content, empty when there is none.
    pub fn content_str(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }

    /// The message as the template sees it: `role`, `content`, then `tool_calls` and the
    /// extra fields. As in transformers, a field whose value is null is left out (a tool-call
    /// message has no `content` key at all). The training flag is lorasft's own and is not
    /// shown to the template.
    pub fn to_template_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), Value::String(self.role.as_str().into()));
        if let Some(c) = &self.content {
            m.insert("content".into(), Value::String(c.clone()));
        }
        if let Some(calls) = self.tool_calls.as_ref().filter(|v| !v.is_null()) {
            m.insert("tool_calls".into(), calls.clone());
        }
        for (k, v) in self.extra.iter().filter(|(_, v)| !v.is_null()) {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(m)
    }
}

/// A conversation: its messages in order and the tools offered to the model, if any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages.
    pub messages: Vec<Message>,
    /// Tool (function) definitions handed to the template as `tools`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
}

impl Conversation {
    /// A conversation of plain messages and no tools.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            tools: None,
        }
    }

    /// The first `n` messages, with the same tools.
    pub fn prefix(&self, n: usize) -> Self {
        Self {
            messages: self.messages[..n.min(self.messages.len())].to_vec(),
            tools: self.tools.clone(),
        }
    }

    /// The messages as the template's `messages` list.
    pub fn template_messages(&self) -> Value {
        Value::Array(
            self.messages
                .iter()
                .map(Message::to_template_value)
                .collect(),
        )
    }
}
