"""Migration 0001: the AppView schema exactly as the 54 TypeScript migrations leave it.

The TypeScript dataplane (bluesky-social/atproto, packages/bsky, branch divy/backfill) builds
its schema with 54 kysely migrations; this one migration creates their final state in one
step, so a psky database and a TypeScript database are interchangeable. The statements run
with ``search_path`` set to the target schema (``public``), hence unqualified names; the
extension is pinned to ``public`` as the TypeScript init migration does.

Besides the DDL it writes the only data the TypeScript migrations write (the two
``view_param`` rows) and records the 54 kysely migrations as executed, so the TypeScript
services accept a database psky created instead of trying to re-create it.
"""

from __future__ import annotations

import re

VERSION = "0001"
NAME = "baseline"

# The kysely migrations, in order: the keys of migrations/index.ts on divy/backfill (a
# leading underscore plus the timestamp) and the file each one comes from.
_KYSELY_TABLE = """
20230309T045948368Z init
20230408T152211201Z notification-init
20230417T210628672Z moderation-init
20230420T211446071Z did-cache
20230427T194702079Z notif-record-index
20230605T144730094Z post-profile-aggs
20230607T211442112Z feed-generator-init
20230608T155101190Z algo-whats-hot-view
20230608T201813132Z mute-lists
20230608T205147239Z mutes
20230609T153623961Z blocks
20230609T232122649Z actor-deletion-indexes
20230610T203555962Z suggested-follows
20230611T215300060Z actor-state
20230620T161134972Z post-langs
20230627T212437895Z optional-handle
20230629T220835893Z remove-post-hierarchy
20230703T045536691Z feed-and-label-indices
20230720T164800037Z posts-cursor-idx
20230807T035309811Z feed-item-delete-invite-for-user-idx
20230808T172902639Z repo-rev
20230810T203349843Z action-duration
20230817T195936007Z native-notifications
20230830T205507322Z suggested-feeds
20230904T211011773Z block-lists
20230906T222220386Z thread-gating
20230920T213858047Z add-tags-to-post
20230929T192920807Z record-cursor-indexes
20231003T202833377Z create-moderation-subject-status
20231220T225126090Z blob-takedowns
20240124T023719200Z tagged-suggestions
20240226T225725627Z labelers
20240530T170337073Z account-deactivation
20240606T171229898Z thread-mutes
20240606T222548219Z starter-packs
20240719T203853939Z priority-notifs
20240723T220700077Z quotes-post-aggs
20240723T220703655Z quotes
20240801T193939827Z post-gate
20240808T224251220Z post-gate-flags
20240829T211238293Z simplify-actor-sync
20240831T134810923Z pinned-posts
20241114T153108102Z add-starter-packs-name
20250116T222618297Z post-embed-video
20250207T174822012Z add-label-exp
20250404T163421487Z verifications
20250526T023712742Z like-repost-via
20250528T221913281Z add-record-tags
20250602T190357447Z add-private-data
20250611T140649895Z add-activity-subscription
20250627T025331240Z add-actor-age-assurance-columns
20250812T183735692Z add-bookmarks
20250813T174955711Z add-post-agg-bookmarks
20251009T040222812Z backfill-init
"""
KYSELY_MIGRATIONS: tuple[tuple[str, str], ...] = tuple(
    ("_" + stamp, f"{stamp}-{slug}") for stamp, slug in (line.split() for line in _KYSELY_TABLE.split("\n") if line)
)
assert len(KYSELY_MIGRATIONS) == 54
assert all(re.fullmatch(r"_\d{8}T\d{9}Z", name) for name, _ in KYSELY_MIGRATIONS)

_DDL = r"""
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

-- ===================================================================== repositories
-- Every indexed record, whatever its collection: the raw lex JSON, the repo revision that
-- wrote it (the rev guard: an older rev never overwrites a newer one) and moderation state.
-- A delete leaves a tombstone row (empty cid and json) so a late stale create stays out.
CREATE TABLE record (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    did character varying NOT NULL,
    json text NOT NULL,
    "indexedAt" character varying NOT NULL,
    "takedownRef" character varying,
    tags jsonb,
    rev character varying NOT NULL,
    CONSTRAINT record_pkey PRIMARY KEY (uri)
);
CREATE INDEX record_did_idx ON record USING btree (did);

-- A record that says the same thing as an earlier one of its author (a second like of
-- the same post, a second follow of the same account, ...): kept aside and promoted to
-- the collection table when the record it duplicates is deleted.
CREATE TABLE duplicate_record (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    "duplicateOf" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    CONSTRAINT duplicate_record_pkey PRIMARY KEY (uri)
);
CREATE INDEX duplicate_record_duplicate_of_idx ON duplicate_record USING btree ("duplicateOf");

-- =========================================================================== actors
-- One row per account: its verified handle (unique; NULL when unverified or contended),
-- the upstream account status (deactivated, suspended, takendown) and AppView flags.
CREATE TABLE actor (
    did character varying NOT NULL,
    handle character varying,
    "indexedAt" character varying NOT NULL,
    "takedownRef" character varying,
    "upstreamStatus" character varying,
    "trustedVerifier" boolean DEFAULT false NOT NULL,
    "ageAssuranceStatus" text,
    "ageAssuranceLastInitiatedAt" character varying,
    CONSTRAINT actor_handle_key UNIQUE (handle),
    CONSTRAINT actor_pkey PRIMARY KEY (did)
);
CREATE INDEX actor_handle_tgrm_idx ON actor USING gist (handle gist_trgm_ops);

-- The last commit (cid and rev) indexed per repository.
CREATE TABLE actor_sync (
    did character varying NOT NULL,
    "commitCid" character varying NOT NULL,
    "repoRev" character varying,
    CONSTRAINT actor_sync_pkey PRIMARY KEY (did)
);

-- Per-viewer notification read state, written by the API, not by the indexer.
CREATE TABLE actor_state (
    did character varying NOT NULL,
    "lastSeenNotifs" character varying NOT NULL,
    "priorityNotifs" boolean DEFAULT false NOT NULL,
    "lastSeenPriorityNotifs" character varying,
    CONSTRAINT actor_state_pkey PRIMARY KEY (did)
);

-- Cached DID documents (updatedAt in epoch milliseconds).
CREATE TABLE did_cache (
    did character varying NOT NULL,
    doc jsonb NOT NULL,
    "updatedAt" bigint NOT NULL,
    CONSTRAINT did_cache_pkey PRIMARY KEY (did)
);

-- ========================================================================= profiles
-- app.bsky.actor.profile (rkey self), incl. the starter pack the account joined through.
CREATE TABLE profile (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "displayName" character varying,
    description character varying,
    "avatarCid" character varying,
    "bannerCid" character varying,
    "indexedAt" character varying NOT NULL,
    "joinedViaStarterPackUri" character varying,
    "createdAt" character varying NOT NULL,
    "pinnedPost" character varying,
    "pinnedPostCid" character varying,
    CONSTRAINT profile_pkey PRIMARY KEY (uri)
);
CREATE INDEX profile_creator_idx ON profile USING btree (creator);
CREATE INDEX profile_display_name_tgrm_idx ON profile USING gist ("displayName" gist_trgm_ops);
CREATE INDEX profile_starter_pack_joined_idx ON profile USING btree ("joinedViaStarterPackUri", "createdAt");

-- Per-account counters kept by the indexer: followers, follows, posts.
CREATE TABLE profile_agg (
    did character varying NOT NULL,
    "followersCount" bigint DEFAULT 0 NOT NULL,
    "followsCount" bigint DEFAULT 0 NOT NULL,
    "postsCount" bigint DEFAULT 0 NOT NULL,
    CONSTRAINT profile_agg_pkey PRIMARY KEY (did)
);

-- ============================================================================ posts
-- app.bsky.feed.post: reply references, langs and tags, and the flags the indexer
-- derives from thread gates and post gates. sortAt = least(createdAt, indexedAt), so a
-- backdated post cannot jump ahead in feeds.
CREATE TABLE post (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    text character varying NOT NULL,
    "replyRoot" character varying,
    "replyRootCid" character varying,
    "replyParent" character varying,
    "replyParentCid" character varying,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    langs jsonb,
    "invalidReplyRoot" boolean,
    "violatesThreadGate" boolean,
    tags jsonb,
    "violatesEmbeddingRules" boolean,
    "hasThreadGate" boolean,
    "hasPostGate" boolean,
    CONSTRAINT post_pkey PRIMARY KEY (uri)
);
CREATE INDEX post_creator_cursor_idx ON post USING btree (creator, "sortAt", cid);
CREATE INDEX post_order_by_idx ON post USING btree ("sortAt", cid);
CREATE INDEX post_replyparent_idx ON post USING btree ("replyParent") INCLUDE (uri);

-- Per-post counters kept by the indexer (bookmarks by the API).
CREATE TABLE post_agg (
    uri character varying NOT NULL,
    "likeCount" bigint DEFAULT 0 NOT NULL,
    "replyCount" bigint DEFAULT 0 NOT NULL,
    "repostCount" bigint DEFAULT 0 NOT NULL,
    "quoteCount" bigint DEFAULT 0 NOT NULL,
    "bookmarkCount" bigint DEFAULT 0 NOT NULL,
    CONSTRAINT post_agg_pkey PRIMARY KEY (uri)
);

-- Embeds of a post, one table per kind (recordWithMedia fills record + its media table).
CREATE TABLE post_embed_image (
    "postUri" character varying NOT NULL,
    "position" character varying NOT NULL,
    "imageCid" character varying NOT NULL,
    alt character varying NOT NULL,
    CONSTRAINT post_embed_image_pkey PRIMARY KEY ("postUri", "position")
);

CREATE TABLE post_embed_external (
    "postUri" character varying NOT NULL,
    uri character varying NOT NULL,
    title character varying NOT NULL,
    description character varying NOT NULL,
    "thumbCid" character varying,
    CONSTRAINT post_embed_external_pkey PRIMARY KEY ("postUri")
);

CREATE TABLE post_embed_record (
    "postUri" character varying NOT NULL,
    "embedUri" character varying NOT NULL,
    "embedCid" character varying NOT NULL,
    CONSTRAINT post_embed_record_pkey PRIMARY KEY ("postUri", "embedUri")
);

CREATE TABLE post_embed_video (
    "postUri" character varying NOT NULL,
    "videoCid" character varying NOT NULL,
    alt character varying,
    CONSTRAINT post_embed_video_pkey PRIMARY KEY ("postUri")
);

-- A post that quotes another (uri = the quoting post, subject = the quoted one).
CREATE TABLE quote (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    subject character varying NOT NULL,
    "subjectCid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT quote_pkey PRIMARY KEY (uri)
);
CREATE INDEX quote_subject_cursor_idx ON quote USING btree (subject, "sortAt", cid);

-- Author feeds and timelines: one row per post and per repost (type 'post' | 'repost').
CREATE TABLE feed_item (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    type character varying NOT NULL,
    "postUri" character varying NOT NULL,
    "originatorDid" character varying NOT NULL,
    "sortAt" character varying NOT NULL,
    CONSTRAINT feed_item_pkey PRIMARY KEY (uri)
);
CREATE INDEX feed_item_cursor_idx ON feed_item USING btree ("sortAt", cid);
CREATE INDEX feed_item_originator_cursor_idx ON feed_item USING btree ("originatorDid", "sortAt", cid);
CREATE INDEX feed_item_post_uri_idx ON feed_item USING btree ("postUri");

-- app.bsky.feed.threadgate: who may reply to a thread (one per root post).
CREATE TABLE thread_gate (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "postUri" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    CONSTRAINT thread_gate_pkey PRIMARY KEY (uri),
    CONSTRAINT "thread_gate_postUri_key" UNIQUE ("postUri")
);

-- app.bsky.feed.postgate: embedding rules and detached quotes (one per post).
CREATE TABLE post_gate (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "postUri" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    CONSTRAINT post_gate_pkey PRIMARY KEY (uri),
    CONSTRAINT "post_gate_postUri_key" UNIQUE ("postUri")
);

-- ====================================================================== interactions
-- app.bsky.feed.like; via/viaCid: the repost the like came through.
CREATE TABLE "like" (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    subject character varying NOT NULL,
    "subjectCid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    via character varying,
    "viaCid" character varying,
    CONSTRAINT like_pkey PRIMARY KEY (uri),
    CONSTRAINT like_unique_subject UNIQUE (subject, creator)
);
CREATE INDEX like_creator_cursor_idx ON "like" USING btree (creator, "sortAt", cid);

-- app.bsky.feed.repost; via/viaCid: the repost it was reposted through.
CREATE TABLE repost (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    subject character varying NOT NULL,
    "subjectCid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    via character varying,
    "viaCid" character varying,
    CONSTRAINT repost_pkey PRIMARY KEY (uri),
    CONSTRAINT repost_unique_subject UNIQUE (creator, subject)
);
CREATE INDEX repost_order_by_idx ON repost USING btree ("sortAt", cid);
CREATE INDEX repost_subject_idx ON repost USING btree (subject);

-- Private bookmarks (written by the API; bookmarkCount in post_agg).
CREATE TABLE bookmark (
    creator character varying NOT NULL,
    key character varying NOT NULL,
    "subjectUri" character varying NOT NULL,
    "subjectCid" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    CONSTRAINT bookmark_pkey PRIMARY KEY (creator, key),
    CONSTRAINT bookmark_unique_uri_creator UNIQUE ("subjectUri", creator)
);

-- ============================================================================= graph
-- app.bsky.graph.follow.
CREATE TABLE follow (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT follow_pkey PRIMARY KEY (uri),
    CONSTRAINT follow_unique_subject UNIQUE (creator, "subjectDid")
);
CREATE INDEX follow_creator_cursor_idx ON follow USING btree (creator, "sortAt", cid);
CREATE INDEX follow_subject_cursor_idx ON follow USING btree ("subjectDid", "sortAt", cid);

-- app.bsky.graph.block.
CREATE TABLE actor_block (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT actor_block_pkey PRIMARY KEY (uri),
    CONSTRAINT actor_block_unique_subject UNIQUE (creator, "subjectDid")
);
CREATE INDEX actor_block_subjectdid_idx ON actor_block USING btree ("subjectDid");

-- app.bsky.graph.list (curation and moderation lists).
CREATE TABLE list (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    name character varying NOT NULL,
    purpose character varying NOT NULL,
    description character varying,
    "descriptionFacets" character varying,
    "avatarCid" character varying,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_pkey PRIMARY KEY (uri)
);
CREATE INDEX list_creator_idx ON list USING btree (creator);

-- app.bsky.graph.listitem: an account on a list.
CREATE TABLE list_item (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "listUri" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_item_pkey PRIMARY KEY (uri),
    CONSTRAINT list_item_unique_subject_in_list UNIQUE ("listUri", "subjectDid")
);
CREATE INDEX list_item_creator_idx ON list_item USING btree (creator);
CREATE INDEX list_item_subject_idx ON list_item USING btree ("subjectDid");

-- app.bsky.graph.listblock: blocking every account of a moderation list.
CREATE TABLE list_block (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "subjectUri" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT list_block_pkey PRIMARY KEY (uri),
    CONSTRAINT list_block_unique_subject UNIQUE (creator, "subjectUri")
);

-- app.bsky.graph.starterpack.
CREATE TABLE starter_pack (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    name character varying,
    CONSTRAINT starter_pack_pkey PRIMARY KEY (uri)
);
CREATE INDEX starter_pack_creator_order_by_idx ON starter_pack USING btree (creator, "sortAt", cid);
CREATE INDEX starter_pack_name_tgrm_idx ON starter_pack USING gist (name gist_trgm_ops);

-- app.bsky.graph.verification: creator vouches for subject's handle and display name.
CREATE TABLE verification (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    rkey character varying NOT NULL,
    creator character varying NOT NULL,
    subject character varying NOT NULL,
    handle character varying NOT NULL,
    "displayName" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortedAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT verification_pkey PRIMARY KEY (uri),
    CONSTRAINT verification_unique_subject_creator UNIQUE (subject, creator)
);

-- Private "notify me about this account's posts/replies" subscriptions (API-written).
CREATE TABLE activity_subscription (
    creator character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    key character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    post boolean NOT NULL,
    reply boolean NOT NULL,
    CONSTRAINT activity_subscription_pkey PRIMARY KEY (creator, key),
    CONSTRAINT activity_subscription_unique_creator_subject_did UNIQUE (creator, "subjectDid")
);

-- ================================================================ feeds and labelers
-- app.bsky.feed.generator: custom feed declarations.
CREATE TABLE feed_generator (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "feedDid" character varying NOT NULL,
    "displayName" character varying,
    description character varying,
    "descriptionFacets" character varying,
    "avatarCid" character varying,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT feed_generator_pkey PRIMARY KEY (uri)
);
CREATE INDEX feed_generator_creator_index ON feed_generator USING btree (creator);

-- app.bsky.labeler.service: labeler declarations (rkey self).
CREATE TABLE labeler (
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    creator character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    "indexedAt" character varying NOT NULL,
    "sortAt" character varying GENERATED ALWAYS AS (LEAST("createdAt", "indexedAt")) STORED NOT NULL,
    CONSTRAINT labeler_pkey PRIMARY KEY (uri)
);
CREATE INDEX labeler_order_by_idx ON labeler USING btree ("sortAt", cid);

-- Labels from subscribeLabels (src = labeler DID; cid '' when the label covers every
-- version); a negation deletes the matching (src, uri, val) label.
CREATE TABLE label (
    src character varying NOT NULL,
    uri character varying NOT NULL,
    cid character varying NOT NULL,
    val character varying NOT NULL,
    neg boolean NOT NULL,
    cts character varying NOT NULL,
    exp character varying,
    CONSTRAINT label_pkey PRIMARY KEY (src, uri, cid, val)
);
CREATE INDEX label_cts_idx ON label USING btree (cts);
CREATE INDEX label_uri_index ON label USING btree (uri);

-- ===================================================================== notifications
-- One row per notification (did = recipient, author = the actor who caused it).
CREATE TABLE notification (
    id bigserial NOT NULL,
    did character varying NOT NULL,
    "recordUri" character varying NOT NULL,
    "recordCid" character varying NOT NULL,
    author character varying NOT NULL,
    reason character varying NOT NULL,
    "reasonSubject" character varying,
    "sortAt" character varying NOT NULL,
    CONSTRAINT notification_pkey PRIMARY KEY (id)
);
CREATE INDEX notification_author_idx ON notification USING btree (author);
CREATE INDEX notification_did_sortat_idx ON notification USING btree (did, "sortAt");
CREATE INDEX notification_record_idx ON notification USING btree ("recordUri");

-- Push notification registrations (API-written).
CREATE TABLE notification_push_token (
    did character varying NOT NULL,
    platform character varying NOT NULL,
    token character varying NOT NULL,
    "appId" character varying NOT NULL,
    CONSTRAINT notification_push_token_pkey PRIMARY KEY (did, token)
);

-- ============================================================ viewer state (API-only)
-- Private mutes of accounts, lists and threads.
CREATE TABLE mute (
    "subjectDid" character varying NOT NULL,
    "mutedByDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    CONSTRAINT mute_pkey PRIMARY KEY ("mutedByDid", "subjectDid")
);

CREATE TABLE list_mute (
    "listUri" character varying NOT NULL,
    "mutedByDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    CONSTRAINT list_mute_pkey PRIMARY KEY ("mutedByDid", "listUri")
);

CREATE TABLE thread_mute (
    "rootUri" character varying NOT NULL,
    "mutedByDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    CONSTRAINT thread_mute_pkey PRIMARY KEY ("rootUri", "mutedByDid")
);

-- Private per-account data (preferences and the like), by namespace and key.
CREATE TABLE private_data (
    "actorDid" character varying NOT NULL,
    namespace character varying NOT NULL,
    key character varying NOT NULL,
    payload text NOT NULL,
    "indexedAt" character varying NOT NULL,
    "updatedAt" character varying NOT NULL,
    CONSTRAINT private_data_pkey PRIMARY KEY ("actorDid", namespace, key)
);

-- ==================================================================== operator state
-- Cursor state of the dataplane's own subscriptions (service + method).
CREATE TABLE subscription (
    service character varying NOT NULL,
    method character varying NOT NULL,
    state character varying NOT NULL,
    CONSTRAINT subscription_pkey PRIMARY KEY (service, method)
);

-- Blobs taken down by moderation.
CREATE TABLE blob_takedown (
    did character varying NOT NULL,
    cid character varying NOT NULL,
    "takedownRef" character varying NOT NULL,
    CONSTRAINT blob_takedown_pkey PRIMARY KEY (did, cid)
);

-- Curated suggestions shown by the API.
CREATE TABLE suggested_feed (
    uri character varying NOT NULL,
    "order" integer NOT NULL,
    CONSTRAINT suggested_feed_pkey PRIMARY KEY (uri)
);

CREATE TABLE suggested_follow (
    did character varying NOT NULL,
    "order" integer NOT NULL,
    CONSTRAINT suggested_follow_pkey PRIMARY KEY (did)
);

CREATE TABLE tagged_suggestion (
    tag character varying NOT NULL,
    subject character varying NOT NULL,
    "subjectType" character varying NOT NULL,
    CONSTRAINT tagged_suggestion_pkey PRIMARY KEY (tag, subject)
);

-- ========================================================= legacy moderation (pre-Ozone)
-- Created by the early moderation migrations and never dropped; nothing in the ingest
-- pipeline reads or writes them, they are kept so both schemas stay identical.
CREATE TABLE moderation_action (
    id serial NOT NULL,
    action character varying NOT NULL,
    "subjectType" character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "subjectUri" character varying,
    "subjectCid" character varying,
    reason text NOT NULL,
    "createdAt" character varying NOT NULL,
    "createdBy" character varying NOT NULL,
    "reversedAt" character varying,
    "reversedBy" character varying,
    "reversedReason" text,
    "createLabelVals" character varying,
    "negateLabelVals" character varying,
    "durationInHours" integer,
    "expiresAt" character varying,
    CONSTRAINT moderation_action_pkey PRIMARY KEY (id)
);

CREATE TABLE moderation_action_subject_blob (
    "actionId" integer NOT NULL,
    cid character varying NOT NULL,
    CONSTRAINT moderation_action_subject_blob_pkey PRIMARY KEY ("actionId", cid),
    CONSTRAINT "moderation_action_subject_blob_actionId_fkey"
        FOREIGN KEY ("actionId") REFERENCES moderation_action(id)
);
CREATE INDEX moderation_action_subject_blob_cid_idx ON moderation_action_subject_blob USING btree (cid);

CREATE TABLE moderation_event (
    id serial NOT NULL,
    action character varying NOT NULL,
    "subjectType" character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "subjectUri" character varying,
    "subjectCid" character varying,
    comment text,
    meta jsonb,
    "createdAt" character varying NOT NULL,
    "createdBy" character varying NOT NULL,
    "reversedAt" character varying,
    "reversedBy" character varying,
    "durationInHours" integer,
    "expiresAt" character varying,
    "reversedReason" text,
    "createLabelVals" character varying,
    "negateLabelVals" character varying,
    "legacyRefId" integer,
    CONSTRAINT moderation_event_pkey PRIMARY KEY (id)
);

CREATE TABLE moderation_report (
    id serial NOT NULL,
    "subjectType" character varying NOT NULL,
    "subjectDid" character varying NOT NULL,
    "subjectUri" character varying,
    "subjectCid" character varying,
    "reasonType" character varying NOT NULL,
    reason text,
    "reportedByDid" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    CONSTRAINT moderation_report_pkey PRIMARY KEY (id)
);

CREATE TABLE moderation_report_resolution (
    "reportId" integer NOT NULL,
    "actionId" integer NOT NULL,
    "createdBy" character varying NOT NULL,
    "createdAt" character varying NOT NULL,
    CONSTRAINT moderation_report_resolution_pkey PRIMARY KEY ("reportId", "actionId"),
    CONSTRAINT "moderation_report_resolution_actionId_fkey"
        FOREIGN KEY ("actionId") REFERENCES moderation_action(id),
    CONSTRAINT "moderation_report_resolution_reportId_fkey"
        FOREIGN KEY ("reportId") REFERENCES moderation_report(id)
);
CREATE INDEX moderation_report_resolution_action_id_idx ON moderation_report_resolution USING btree ("actionId");

CREATE TABLE moderation_subject_status (
    id serial NOT NULL,
    did character varying NOT NULL,
    "recordPath" character varying DEFAULT '' NOT NULL,
    "blobCids" jsonb,
    "recordCid" character varying,
    "reviewState" character varying NOT NULL,
    comment character varying,
    "muteUntil" character varying,
    "lastReviewedAt" character varying,
    "lastReviewedBy" character varying,
    "lastReportedAt" character varying,
    takendown boolean DEFAULT false NOT NULL,
    "suspendUntil" character varying,
    "createdAt" character varying NOT NULL,
    "updatedAt" character varying NOT NULL,
    CONSTRAINT moderation_status_unique_idx UNIQUE (did, "recordPath"),
    CONSTRAINT moderation_subject_status_pkey PRIMARY KEY (id)
);
CREATE INDEX moderation_subject_status_blob_cids_idx ON moderation_subject_status USING gin ("blobCids");

-- ========================================================== "what's hot" (legacy feed)
-- Runtime parameters of the materialized view below (it cannot be altered cheaply).
CREATE TABLE view_param (
    name character varying NOT NULL,
    value character varying,
    CONSTRAINT view_param_pkey PRIMARY KEY (name)
);
INSERT INTO view_param (name, value)
VALUES ('whats_hot_like_threshold', '2'), ('whats_hot_interval', '1day');

-- Recent top-level posts scored by likes decayed with age (Hacker News style, gravity
-- 1.8). The unique index on uri is what REFRESH MATERIALIZED VIEW CONCURRENTLY needs.
CREATE MATERIALIZED VIEW algo_whats_hot_view AS
 SELECT post.uri,
    post.cid,
    round(((1000000)::numeric * ((post_agg."likeCount")::numeric / (((EXTRACT(epoch FROM age(now(), ((post."indexedAt")::timestamp without time zone)::timestamp with time zone)) / (3600)::numeric) + (2)::numeric) ^ 1.8)))) AS score
   FROM (post
     JOIN post_agg ON (((post_agg.uri)::text = (post.uri)::text)))
  WHERE (((post."indexedAt")::text > ( SELECT to_char((now() - (view_param.value)::interval), 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'::text) AS val
           FROM view_param
          WHERE ((view_param.name)::text = 'whats_hot_interval'::text))) AND (post."replyParent" IS NULL) AND (post_agg."likeCount" > ( SELECT (view_param.value)::integer AS val
           FROM view_param
          WHERE ((view_param.name)::text = 'whats_hot_like_threshold'::text))));
CREATE INDEX algo_whats_hot_view_cursor_idx ON algo_whats_hot_view USING btree (score, cid);
CREATE UNIQUE INDEX algo_whats_hot_view_uri_idx ON algo_whats_hot_view USING btree (uri);

-- ======================================================= TypeScript migrator bookkeeping
-- kysely's tables, filled as if its 54 migrations had run (they describe this schema), so
-- the TypeScript dataplane can run against a psky database and vice versa.
CREATE TABLE kysely_migration (
    name character varying(255) NOT NULL,
    "timestamp" character varying(255) NOT NULL,
    CONSTRAINT kysely_migration_pkey PRIMARY KEY (name)
);

CREATE TABLE kysely_migration_lock (
    id character varying(255) NOT NULL,
    is_locked integer DEFAULT 0 NOT NULL,
    CONSTRAINT kysely_migration_lock_pkey PRIMARY KEY (id)
);
INSERT INTO kysely_migration_lock (id, is_locked) VALUES ('migration_lock', 0);
"""

_KYSELY_ROWS = ",\n".join(f"    ('{name}')" for name, _ in KYSELY_MIGRATIONS)

SQL = (
    _DDL
    + "INSERT INTO kysely_migration (name, \"timestamp\")\n"
    + "SELECT v.name, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')\n"
    + f"FROM (VALUES\n{_KYSELY_ROWS}\n) AS v(name);\n"
)
