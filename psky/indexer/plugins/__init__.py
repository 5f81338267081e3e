"""One plugin per indexed collection (the TypeScript AppView's 18 record processors)."""

from __future__ import annotations

from psky.indexer.plugins.actor import (
    ChatDeclaration,
    FeedGenerator,
    Labeler,
    NotificationDeclaration,
    Profile,
    Status,
)
from psky.indexer.plugins.base import AggKey, Notif, Plugin, RecordOp, SkipRecord
from psky.indexer.plugins.gates import Postgate, Threadgate
from psky.indexer.plugins.graph import Block, Follow, List, ListBlock, ListItem, StarterPack, Verification
from psky.indexer.plugins.like import Like
from psky.indexer.plugins.post import Post
from psky.indexer.plugins.repost import Repost

__all__ = ["PLUGINS", "AggKey", "Notif", "Plugin", "RecordOp", "SkipRecord", "plugin_for"]

#: collection NSID → plugin, in the order the executor writes tables within a wave
PLUGINS: dict[str, Plugin] = {
    p.collection: p
    for p in (
        Post(),
        Threadgate(),
        Postgate(),
        Like(),
        Repost(),
        Follow(),
        Profile(),
        List(),
        ListItem(),
        ListBlock(),
        Block(),
        FeedGenerator(),
        StarterPack(),
        Labeler(),
        NotificationDeclaration(),
        ChatDeclaration(),
        Verification(),
        Status(),
    )
}


def plugin_for(collection: str) -> Plugin | None:
    return PLUGINS.get(collection)
