//! The in-process bus of the embedded default: every user's connection lives in this
//! instance's registry, so delivery is a push into it.

use std::sync::Arc;

use super::{Bus, Frame};
use crate::ids::UserId;
use crate::registry::Registry;

pub struct LocalBus {
    registry: Arc<Registry>,
}

impl LocalBus {
    pub fn new(registry: Arc<Registry>) -> Self {
        LocalBus { registry }
    }
}

impl Bus for LocalBus {
    fn deliver(&self, user: &UserId, frame: Frame) {
        self.registry.push(user, frame);
    }
}
