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
