"""The e621 export's file layout and column contracts, in one place."""

from __future__ import annotations

import re

POSTS_COLUMNS: tuple[str, ...] = (
    "id",
    "uploader_id",
    "created_at",
    "md5",
    "source",
    "rating",
    "image_width",
    "image_height",
    "tag_string",
    "locked_tags",
    "fav_count",
    "file_ext",
    "parent_id",
    "change_seq",
    "approver_id",
    "file_size",
    "comment_count",
    "description",
    "duration",
    "updated_at",
    "is_deleted",
    "is_pending",
    "is_flagged",
    "score",
    "up_score",
    "down_score",
    "is_rating_locked",
    "is_status_locked",
    "is_note_locked",
)
# Added by e621's current export (June 2026); absent from old dumps, read when present.
POSTS_NEW_COLUMNS: tuple[str, ...] = ("bg_color", "last_noted_at", "last_commented_at")
POSTS_ALL_COLUMNS: tuple[str, ...] = POSTS_COLUMNS + POSTS_NEW_COLUMNS
TAGS_COLUMNS: tuple[str, ...] = ("id", "name", "category", "post_count")
TAGS_NEW_COLUMNS: tuple[str, ...] = ("created_at", "updated_at", "is_locked")
POOLS_COLUMNS: tuple[str, ...] = (
    "id",
    "name",
    "created_at",
    "updated_at",
    "creator_id",
    "description",
    "is_active",
    "category",
    "post_ids",
)

TAG_CATEGORIES: dict[int, str] = {
    0: "general",
    1: "artist",
    2: "contributor",
    3: "copyright",
    4: "character",
    5: "species",
    6: "invalid",
    7: "meta",
    8: "lore",
}
RATINGS: tuple[str, ...] = ("s", "q", "e")

SITE_LAUNCH = "2007-02-10"

# posts-2024-01-31.csv.gz; the date is validated again as a real calendar date by callers.
DUMP_FILE_RE = re.compile(r"^(posts|tags|pools)-(\d{4}-\d{2}-\d{2})\.csv\.gz$")


# The current layout's undated names, as listed in db_exports.json.
CURRENT_FILE_RE = re.compile(r"^[a-z_]+\.csv\.gz$")


def dump_file_name(kind: str, date: str) -> str:
    return f"{kind}-{date}.csv.gz"


# What each column of the tables this project writes means, in one place: the assets attach
# these to `dagster/column_schema`, so the UI's column list explains itself.
_EXPORT_COLUMNS: dict[str, str] = {
    "id": "e621 post id (primary key)",
    "uploader_id": "user id of the uploader",
    "created_at": "upload time (UTC)",
    "md5": "MD5 of the file, hex",
    "source": "source URLs as given by users, newline-separated",
    "rating": "s (safe), q (questionable) or e (explicit)",
    "image_width": "width in pixels",
    "image_height": "height in pixels",
    "tag_string": "space-separated tags, as exported",
    "locked_tags": "space-separated tags locked by staff",
    "fav_count": "favourites at the dump: the outcome the model explains",
    "file_ext": "file type: png, jpg, gif, webm, ...",
    "parent_id": "parent post id, if any",
    "change_seq": "change sequence number (a newer edit has a larger one)",
    "approver_id": "user id of the approver, if any",
    "file_size": "file size in bytes",
    "comment_count": "comments at the dump (engagement; not a model input)",
    "description": "free-text description",
    "duration": "seconds, for animations and videos",
    "updated_at": "last update time (UTC)",
    "is_deleted": "deleted on e621 (scored, but never trained on)",
    "is_pending": "awaiting approval",
    "is_flagged": "flagged for deletion",
    "score": "up_score + down_score (engagement; not a model input)",
    "up_score": "upvotes (engagement; not a model input)",
    "down_score": "downvotes, <= 0 (engagement; not a model input)",
    "is_rating_locked": "rating locked by staff",
    "is_status_locked": "status locked by staff",
    "is_note_locked": "notes locked by staff",
    "bg_color": "background colour set for transparent images, if any",
    "last_noted_at": "time of the last note edit (UTC), if any",
    "last_commented_at": "time of the last comment (UTC), if any",
}
_SCORE_COLUMNS: dict[str, str] = {
    "id": "e621 post id (primary key)",
    "fav_count": "favourites at the dump",
    "expected_fav_count": "the model's predictive median favourite count, from metadata only",
    "fav_score": "P(favourites <= observed | metadata), in [0, 1]; 0.5 = as expected, "
    "0.97 = beats 97% of what posts like it get",
    "fav_zscore": "(log1p(fav_count) - pred_log_mean) / pred_log_scale",
    "dump_date": "date of the dump the post was scored from",
    "pred_log_mean": "predictive mean of log1p(fav_count)",
    "pred_log_scale": "predictive standard deviation of log1p(fav_count)",
    "rating": _EXPORT_COLUMNS["rating"],
    "file_ext": _EXPORT_COLUMNS["file_ext"],
    "created_at": _EXPORT_COLUMNS["created_at"],
    "is_deleted": _EXPORT_COLUMNS["is_deleted"],
    "mu": "predictive mean of log1p(fav_count)",
    "sigma": "predictive standard deviation of log1p(fav_count)",
}
COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "cleaned_posts": {
        **_EXPORT_COLUMNS,
    },
    "rejected_rows": {
        "dump_date": "date of the dump the row came from",
        "file": "which export file: posts, tags, pools",
        "stage": "csv (unparsable line) or typing (a value that cannot be repaired)",
        "line": "line number in the file, when known",
        "id": "the row's id as written, when readable",
        "reason": "why the row could not be repaired",
        "raw": "the row as read, or its key fields (first 4 KiB)",
    },
    "tag_vocabulary": {
        "name": "tag name",
        "category": "e621 tag category code (0 general, 1 artist, 3 copyright, 4 character, "
        "5 species, 6 invalid, 7 meta, 8 lore; -1 unknown)",
        "category_name": "tag category in words",
        "freq": "posts of this dump carrying the tag",
        "dump_post_count": "post_count from the tags export",
        "in_vocab": "frequent enough for its own index (else it shares a hashed bucket)",
        "tag_index": "dense index used by the feature matrix",
    },
    "feature_matrix": {
        "id": "e621 post id",
        "fav_count": "favourites at the dump",
        "y": "log1p(fav_count): the training target",
        "tags": "tag indices, fixed width (padding 0)",
        "rating_idx": "rating as an index",
        "ext_idx": "file type as an index",
        "t_upload_years": "upload time in years since the site's launch",
        "holdout": "held out by a hash of the id: never trained on, used for metrics",
        "trainable": "may be trained on (not held out, not deleted)",
    },
    "scored_posts": _SCORE_COLUMNS,
}


def column_description(table: str, column: str) -> str | None:
    """What `column` of `table` means; derived feature columns are described by their name."""
    known = COLUMN_DESCRIPTIONS.get(table, {}).get(column)
    if known is None and table == "feature_matrix" and column.startswith("age_under_"):
        knot = column.removeprefix("age_under_")
        return f"how far under {knot} old the post was at the dump, in log age (model input)"
    if known is None and table == "feature_matrix" and column.startswith(("log_", "has_")):
        kind = "log of" if column.startswith("log_") else "1 if the post has"
        return f"{kind} {column.split('_', 1)[1].replace('_', ' ')} (model input)"
    return known
