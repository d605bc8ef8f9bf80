//! Conversations and chat templates: the model's own template rendered as transformers renders
//! it, and the assistant's trainable spans found in the rendered text.

pub mod locate;
pub mod message;
pub mod pyjson;
pub mod spans;
pub mod template;

pub use message::{Conversation, Message, Role};
pub use template::{ChatTemplate, RenderOptions, Rendered};
