//! A value that a configuration reload replaces as a whole: readers take a snapshot
//! (`get`), so an association or a request sees one consistent configuration from start to end.

use std::sync::{Arc, RwLock};

pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Live(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The current value. A poisoned lock (a panic while replacing) still yields the value.
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, value: T) {
        let value = Arc::new(value);
        match self.0.write() {
            Ok(mut g) => *g = value,
            Err(p) => *p.into_inner() = value,
        }
    }
}
