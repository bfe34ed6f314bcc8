//! Topic → (sink, route) resolution.
//!
//! Each sink lists routes; each route lists topic patterns. A pattern is an exact topic name or
//! a glob (`*` matches any run of characters, `?` one character, `[abc]` a class). An exact name
//! beats any pattern; among patterns the first one in configuration order (sinks by name, then
//! routes in file order) wins. A topic that no route matches is dead-lettered with the reason
//! "no route".

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use globset::{GlobBuilder, GlobMatcher};

use crate::sinks::SinkConfig;

/// Where a topic goes: the sink's position in the sink list and the route's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub sink: usize,
    pub route: usize,
}

pub struct Router {
    exact: HashMap<String, Target>,
    patterns: Vec<(GlobMatcher, Target)>,
    cache: Mutex<HashMap<String, Option<Target>>>,
}

impl Router {
    /// Sinks are numbered in the map's (name) order, the order of the dispatcher's sink list.
    /// A problem comes back as a sentence naming the key to fix.
    pub fn new(sinks: &BTreeMap<String, SinkConfig>) -> Result<Self, String> {
        let mut exact = HashMap::new();
        let mut patterns = Vec::new();
        for (sink, (name, config)) in sinks.iter().enumerate() {
            for (route, topics) in config.route_topics().into_iter().enumerate() {
                if topics.is_empty() {
                    return Err(format!(
                        "sinks.{name}.routes[{route}].topics is empty: list at least one topic or pattern such as \"orders.*\""
                    ));
                }
                for topic in topics {
                    let target = Target { sink, route };
                    if topic.contains(['*', '?', '[']) {
                        let glob = GlobBuilder::new(topic).literal_separator(false).build().map_err(|e| {
                            format!("sinks.{name}.routes[{route}].topics: bad pattern {topic:?}: {e}")
                        })?;
                        patterns.push((glob.compile_matcher(), target));
                    } else if let Some(prev) = exact.insert(topic.clone(), target) {
                        if prev != target {
                            return Err(format!(
                                "topic {topic:?} is routed twice (sinks.{name}.routes[{route}] and an earlier route): keep one"
                            ));
                        }
                    }
                }
            }
        }
        Ok(Self {
            exact,
            patterns,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn route(&self, topic: &str) -> Option<Target> {
        if let Some(t) = self.exact.get(topic) {
            return Some(*t);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(topic) {
            return *t;
        }
        let found = self
            .patterns
            .iter()
            .find(|(m, _)| m.is_match(topic))
            .map(|(_, t)| *t);
        if cache.len() < 100_000 {
            cache.insert(topic.to_owned(), found);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::memory::{MemoryConfig, MemoryRoute};

    fn sink(routes: &[&[&str]]) -> SinkConfig {
        SinkConfig::Memory(MemoryConfig {
            routes: routes
                .iter()
                .map(|t| MemoryRoute {
                    topics: t.iter().map(|s| s.to_string()).collect(),
                    destination: "x.{topic}".into(),
                })
                .collect(),
            ..MemoryConfig::default()
        })
    }

    #[test]
    fn exact_beats_pattern_and_first_pattern_wins() {
        let mut sinks = BTreeMap::new();
        sinks.insert("a".to_string(), sink(&[&["orders.*"], &["*"]]));
        sinks.insert("b".to_string(), sink(&[&["orders.paid"]]));
        let r = Router::new(&sinks).unwrap();
        assert_eq!(r.route("orders.paid"), Some(Target { sink: 1, route: 0 }));
        assert_eq!(
            r.route("orders.created"),
            Some(Target { sink: 0, route: 0 })
        );
        assert_eq!(r.route("users.created"), Some(Target { sink: 0, route: 1 }));
    }

    #[test]
    fn unrouted_topic_is_none() {
        let mut sinks = BTreeMap::new();
        sinks.insert("a".to_string(), sink(&[&["orders.*"]]));
        let r = Router::new(&sinks).unwrap();
        assert_eq!(r.route("users.created"), None);
    }

    #[test]
    fn empty_topics_is_an_error() {
        let mut sinks = BTreeMap::new();
        sinks.insert("a".to_string(), sink(&[&[]]));
        let err = Router::new(&sinks).err().unwrap().to_string();
        assert!(err.contains("sinks.a.routes[0].topics is empty"), "{err}");
    }
}
