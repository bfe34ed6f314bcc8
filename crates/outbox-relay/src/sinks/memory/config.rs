//! `kind = "memory"`: the in-memory sink's settings, their defaults and their validation.

use serde::{Deserialize, Serialize};

use crate::sinks::{validate_template, RouteTopics};

/// `kind = "memory"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub routes: Vec<MemoryRoute>,
    /// Answer [`Outcome::Duplicate`](crate::sinks::Outcome::Duplicate) for a message id that
    /// was delivered before, as a deduplicating broker does.
    pub deduplicate: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            routes: vec![MemoryRoute {
                topics: vec!["*".into()],
                destination: default_destination(),
            }],
            deduplicate: true,
        }
    }
}

/// Topics → destination. `destination` may use `{topic}` and `{key}`; it is only recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRoute {
    pub topics: Vec<String>,
    #[serde(default = "default_destination")]
    pub destination: String,
}

fn default_destination() -> String {
    "{topic}".into()
}

impl RouteTopics for MemoryRoute {
    fn topics(&self) -> &[String] {
        &self.topics
    }
}

impl MemoryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.routes.is_empty() {
            return Err("routes: add at least one [[sinks.<name>.routes]] with topics".into());
        }
        for (i, route) in self.routes.iter().enumerate() {
            validate_template(&format!("routes[{i}].destination"), &route.destination)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_topics_only() {
        let c: MemoryConfig = toml::from_str(r#"routes = [{ topics = ["orders.*"] }]"#).unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes[0].destination, "{topic}");
        assert!(c.deduplicate);
        let c = MemoryConfig {
            routes: vec![],
            ..MemoryConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("routes:"));
    }
}
