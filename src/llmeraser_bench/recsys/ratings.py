"""Loaders of public rating data sets into one typed structure, :class:`RatingData`.

Supported layouts (``format`` argument of :func:`load_ratings`; detected from the file names when omitted):

- ``recbole``: RecBole atomic files ``<name>.inter`` + ``<name>.item`` (tab-separated, header of
  ``name:type`` fields, any column order; columns found by name).
- ``movielens``: raw MovieLens, either the ml-100k layout (``u.data`` + ``u.item``), the ml-1m layout
  (``ratings.dat`` + ``movies.dat``, ``::``-separated) or the ml-latest / ml-20m / ml-25m layout
  (``ratings.csv`` + ``movies.csv``).
- ``bookcrossing``: ``BX-Book-Ratings.csv`` + ``BX-Books.csv`` (``;``-separated, quoted, latin-1). Rating 0
  (an implicit interaction) is dropped unless ``keep_implicit=True``.
- ``lastfm``: hetrec-2011 ``user_artists.dat`` + ``artists.dat``; the "rating" is the play count.

Files are read line by line as UTF-8, falling back to latin-1 for a line that is not valid UTF-8; CRLF line
ends, a UTF-8 BOM, blank lines and extra columns are accepted, and a header line is optional where the raw
format allows either. Data without timestamps get the row's position in the file as its time.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import html
import importlib.util
import math
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from llmeraser.errors import InputError

RatingFormat = Literal["recbole", "movielens", "bookcrossing", "lastfm"]
FORMATS: tuple[str, ...] = get_args(RatingFormat)

RECBOLE_INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


@dataclass(frozen=True, slots=True)
class Interaction:
    """One rating event. ``rating`` is in the data set's own unit (see :class:`RatingScale`);
    ``timestamp`` is seconds since the epoch, or the row's 0-based position in the file when the data set
    has no timestamps (``RatingData.has_timestamps`` is False)."""

    user_id: str
    item_id: str
    rating: float
    timestamp: int


@dataclass(frozen=True)
class RatingScale:
    """What a rating means. ``low``/``high`` bound the values (observed ones for play counts).

    An interaction is *liked* iff ``rating > like_above``; ``like_above is None`` means implicit feedback
    (play counts), where liked means above the user's own median.
    """

    low: float
    high: float
    like_above: float | None
    unit: str  # "stars", "points", "plays", "label"

    def is_liked(self, rating: float, user_median: float | None = None) -> bool:
        """Liked by the scale's rule; ``user_median`` is required for implicit scales."""
        if self.like_above is not None:
            return rating > self.like_above
        if user_median is None:
            raise ValueError("this scale judges likes against the user's median; pass user_median")
        return rating > user_median


@dataclass
class RatingData:
    """A rating data set: interactions in file order, and a title for every item id.

    Every item id that occurs in ``interactions`` has a title (``"item <id>"`` when the items file does not
    know it). ``item_noun`` ("movie", "book", "artist" or "item") names what the items are, for prompts.
    """

    name: str
    format: str
    interactions: list[Interaction]
    item_titles: dict[str, str]
    scale: RatingScale
    has_timestamps: bool
    item_noun: str = "item"
    source: Path | None = None

    def title(self, item_id: str) -> str:
        """The item's title, or the placeholder ``item <id>``."""
        return self.item_titles.get(item_id, placeholder_title(item_id))

    def by_user(self) -> dict[str, list[Interaction]]:
        """Interactions grouped by user, each list in chronological order (ties keep file order), users in
        natural id order (numeric ids numerically)."""
        groups: dict[str, list[Interaction]] = {}
        for interaction in self.interactions:
            groups.setdefault(interaction.user_id, []).append(interaction)
        return {
            user: sorted(groups[user], key=lambda i: i.timestamp) for user in sorted(groups, key=natural_key)
        }

    def users(self) -> list[str]:
        """Distinct user ids in natural order."""
        return sorted({i.user_id for i in self.interactions}, key=natural_key)


def natural_key(value: str) -> tuple[int, int, str]:
    """Sort key putting numeric ids first in numeric order, then the others alphabetically."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def placeholder_title(item_id: str) -> str:
    """Title used for an item the items file does not describe."""
    return f"item {item_id}"


def default_ml100k_path() -> Path:
    """Directory of the MovieLens-100k copy (RecBole atomic files) shipped inside the ``recbole`` package.

    The package is located without being imported. MovieLens terms: research use, cite Harper & Konstan
    (2015), do not redistribute the files.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the MovieLens-100k example data needs the recbole package: {RECBOLE_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / "ml-100k"
        if (candidate / "ml-100k.inter").is_file():
            return candidate
    raise InputError(
        f"recbole is installed but has no dataset_example/ml-100k/ml-100k.inter; reinstall: {RECBOLE_INSTALL_HINT}"
    )


# --------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def bulk_allocation() -> Generator[None, None, None]:
    """Pause the cyclic garbage collector while creating many small acyclic objects (rows, records):
    with a large heap (torch imported) its repeated full scans otherwise double the loading time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, text)`` for each non-blank line, without the line end."""
    if not path.is_file():
        raise InputError("file not found", path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text = _decode(raw).rstrip("\r\n")
            if text.strip():
                yield number, text


def _norm(name: str) -> str:
    """Header name normalised for matching: RecBole ``:type`` cut, lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.split(":", 1)[0].strip().strip('"').lower())


@dataclass(frozen=True)
class _Column:
    role: str
    position: int  # used when the file has no header
    names: tuple[str, ...]  # accepted normalised header names, in order of preference
    required: bool = True


Splitter = Callable[[str], list[str]]


def _split_on(separator: str) -> Splitter:
    return lambda line: line.split(separator)


def _split_csv(delimiter: str) -> Splitter:
    def split(line: str) -> list[str]:
        return next(csv.reader([line], delimiter=delimiter))

    return split


def _table(
    path: Path,
    split: Splitter,
    columns: Sequence[_Column],
    *,
    header: str = "optional",
    what: str = "",
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a delimited file as ``(line, {role: raw value})``.

    ``header``: "optional" (the first line is a header iff one of its fields is a known column name),
    "required" or "none". With a header, columns are found by name (any order, extra columns ignored);
    without, by position.
    """
    positions: dict[str, int] | None = None
    width = 0
    sep_name = what or "fields"
    for number, line in _lines(path):
        fields = split(line)
        if positions is None:
            names = [_norm(f) for f in fields]
            known = {n for column in columns for n in column.names}
            is_header = header == "required" or (header == "optional" and any(n in known for n in names))
            if is_header:
                positions = {}
                for column in columns:
                    found = next((names.index(n) for n in column.names if n in names), None)
                    if found is None:
                        if column.required:
                            raise InputError(
                                f"header has no {column.role} column (expected one of: {', '.join(column.names)})",
                                path,
                                number,
                            )
                        continue
                    positions[column.role] = found
                width = max(positions.values()) + 1
                continue
            positions = {column.role: column.position for column in columns if column.required}
            width = max(positions.values()) + 1
        if len(fields) < width:
            raise InputError(f"expected at least {width} {sep_name}, got {len(fields)}", path, number)
        yield number, {role: fields[index].strip() for role, index in positions.items()}


def _number(value: str, what: str, path: Path, line: int) -> float:
    try:
        number = float(value.strip().strip('"'))
    except ValueError:
        raise InputError(f"{what} {value!r} is not a number", path, line) from None
    if not math.isfinite(number):
        raise InputError(f"{what} {value!r} is not a finite number", path, line)
    return number


def _timestamp(value: str, path: Path, line: int) -> int:
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        return int(_number(value, "timestamp", path, line))


def _clean_title(title: str) -> str:
    return " ".join(title.split())


def _find(directory: Path, *names: str) -> Path | None:
    """The first file in ``directory`` whose name equals one of ``names``, ignoring case."""
    if not directory.is_dir():
        return None
    by_lower = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    for name in names:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    return None


def _require(directory: Path, fmt: str, *names: str) -> Path:
    found = _find(directory, *names)
    if found is None:
        raise InputError(f"missing {' or '.join(names)} ({fmt} format)", directory)
    return found


def _ratings_rows(
    path: Path, rows: Iterator[tuple[int, dict[str, str]]], timestamps: bool, keep: Callable[[float], bool]
) -> list[Interaction]:
    interactions: list[Interaction] = []
    for line, row in rows:
        rating = _number(row["rating"], "rating", path, line)
        if not keep(rating):
            continue
        if not row["user"] or not row["item"]:
            raise InputError("empty user or item id", path, line)
        time = _timestamp(row["timestamp"], path, line) if timestamps else len(interactions)
        interactions.append(Interaction(row["user"], row["item"], rating, time))
    if not interactions:
        raise InputError("no ratings in file", path)
    return interactions


def _titles(path: Path, rows: Iterator[tuple[int, dict[str, str]]], clean: Callable[[str], str]) -> dict[str, str]:
    titles: dict[str, str] = {}
    for _, row in rows:
        title = _clean_title(clean(row["title"]))
        if row["id"] and title:
            titles.setdefault(row["id"], title)
    return titles


def _with_placeholders(titles: dict[str, str], interactions: Sequence[Interaction]) -> dict[str, str]:
    for interaction in interactions:
        if interaction.item_id not in titles:
            titles[interaction.item_id] = placeholder_title(interaction.item_id)
    return titles


def _observed_range(interactions: Sequence[Interaction]) -> tuple[float, float]:
    ratings = [i.rating for i in interactions]
    return min(ratings), max(ratings)


# --------------------------------------------------------------------------------------------- formats


_USER = ("userid", "user")
_TIME = ("timestamp", "time")


def _load_recbole(directory: Path, inter: Path | None) -> RatingData:
    if inter is None:
        candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".inter")
        preferred = [p for p in candidates if p.stem == directory.name]
        if preferred:
            inter = preferred[0]
        elif len(candidates) == 1:
            inter = candidates[0]
        elif not candidates:
            raise InputError("missing <name>.inter (recbole format)", directory)
        else:
            listed = ", ".join(p.name for p in candidates)
            raise InputError(f"several .inter files ({listed}); pass the one to load as the path", directory)
    item_file = inter.with_suffix(".item")
    if not item_file.is_file():
        raise InputError(f"missing {item_file.name} (recbole format: item titles)", directory)

    # RecBole atomic files always carry a header of `name:type` fields.
    header = next(_lines(inter), (0, ""))[1]
    names = [_norm(f) for f in header.split("\t")]
    item_names = ("itemid", "artistid", "bookid", "movieid", "isbn")
    rating_names = ("rating", "label", "weight", "playcount", "count", "score")
    item_role = next((n for n in item_names if n in names), None)
    if item_role is None:
        raise InputError(f"header has no item id column (expected one of: {', '.join(item_names)})", inter, 1)
    rating_name = next((n for n in rating_names if n in names), None)
    has_time = "timestamp" in names
    columns = [
        _Column("user", 0, ("userid",)),
        _Column("item", 1, item_names),
        _Column("rating", 2, rating_names),
        _Column("timestamp", 3, ("timestamp",), required=has_time),
    ]
    rows = _table(inter, _split_on("\t"), columns, header="required", what="tab-separated fields")
    interactions = _ratings_rows(inter, rows, has_time, lambda r: True)

    item_header = next(_lines(item_file), (0, ""))[1]
    item_fields = [_norm(f) for f in item_header.split("\t")]
    title_name = next((n for n in item_fields if "title" in n), None) or next(
        (n for n in item_fields if n.endswith("name")), None
    )
    if title_name is None:
        raise InputError("header has no title or name column", item_file, 1)
    id_name = item_role if item_role in item_fields else item_fields[0]
    year_name = next((n for n in ("releaseyear", "year") if n in item_fields), None)
    item_columns = [_Column("id", 0, (id_name,)), _Column("title", 1, (title_name,))]
    if year_name is not None:
        item_columns.append(_Column("year", 2, (year_name,)))
    titles: dict[str, str] = {}
    for _, row in _table(item_file, _split_on("\t"), item_columns, header="required", what="tab-separated fields"):
        title = _clean_title(row["title"])
        year = row.get("year", "").strip()
        if year and title and not title.endswith(f"({year})"):
            title = f"{title} ({year})"  # matches raw MovieLens titles, e.g. "Toy Story (1995)"
        if row["id"] and title:
            titles.setdefault(row["id"], title)

    low, high = _observed_range(interactions)
    if rating_name in ("weight", "playcount", "count"):
        scale = RatingScale(low, high, None, "plays")
    elif high <= 1:
        scale = RatingScale(low, high, 0.0, "label")
    elif high <= 5:
        scale = RatingScale(low, 5.0, 3.0, "stars")
    elif high <= 10:
        scale = RatingScale(low, 10.0, 5.0, "points")
    else:
        scale = RatingScale(low, high, None, "plays")
    noun = (
        "movie"
        if "movie" in title_name
        else "book"
        if "book" in title_name
        else "artist"
        if "artist" in title_name or item_role == "artistid"
        else "item"
    )
    return RatingData(
        name=inter.stem,
        format="recbole",
        interactions=interactions,
        item_titles=_with_placeholders(titles, interactions),
        scale=scale,
        has_timestamps=has_time,
        item_noun=noun,
        source=inter.parent,
    )


def _load_movielens(directory: Path) -> RatingData:
    rating_columns = [
        _Column("user", 0, _USER),
        _Column("item", 1, ("movieid", "itemid", "movie", "item")),
        _Column("rating", 2, ("rating",)),
        _Column("timestamp", 3, _TIME),
    ]
    title_columns = [_Column("id", 0, ("movieid", "itemid", "id")), _Column("title", 1, ("title", "movietitle"))]
    if (ratings := _find(directory, "u.data")) is not None:
        items = _require(directory, "movielens ml-100k layout", "u.item")
        rows = _table(ratings, _split_on("\t"), rating_columns, what="tab-separated fields")
        title_rows = _table(items, _split_on("|"), title_columns, what="|-separated fields")
    elif (ratings := _find(directory, "ratings.csv")) is not None:
        items = _require(directory, "movielens ml-latest layout", "movies.csv")
        rows = _table(ratings, _split_csv(","), rating_columns, what="comma-separated fields")
        title_rows = _table(items, _split_csv(","), title_columns, what="comma-separated fields")
    elif (ratings := _find(directory, "ratings.dat")) is not None:
        items = _require(directory, "movielens ml-1m layout", "movies.dat")
        rows = _table(ratings, _split_on("::"), rating_columns, what="::-separated fields")
        title_rows = _table(items, _split_on("::"), title_columns, what="::-separated fields")
    else:
        raise InputError("missing u.data, ratings.csv or ratings.dat (movielens format)", directory)
    interactions = _ratings_rows(ratings, rows, True, lambda r: True)
    titles = _titles(items, title_rows, lambda t: t)
    low, _ = _observed_range(interactions)
    return RatingData(
        name=directory.name,
        format="movielens",
        interactions=interactions,
        item_titles=_with_placeholders(titles, interactions),
        scale=RatingScale(low, 5.0, 3.0, "stars"),
        has_timestamps=True,
        item_noun="movie",
        source=directory,
    )


def _split_bx(line: str) -> list[str]:
    """Split a BookCrossing line: every field quoted and separated by ``;``. Splitting on ``";"`` keeps
    the wild ``\\"`` escapes inside fields intact; lines not fully quoted fall back to the csv module."""
    stripped = line.strip()
    if len(stripped) >= 2 and stripped.startswith('"') and stripped.endswith('"'):
        return stripped[1:-1].split('";"')
    return next(csv.reader([line], delimiter=";"))


def _clean_bx_title(title: str) -> str:
    """Repair BookCrossing title quirks: an author glued on after ``\\";`` (a broken escape in the dump),
    ``\\"`` escapes, a stray trailing backslash, HTML entities such as ``&amp;``."""
    if '\\";' in title:
        title = title.split('\\";', 1)[0]
    title = title.replace('\\"', '"').rstrip("\\")
    return html.unescape(title).strip()


def _load_bookcrossing(directory: Path, keep_implicit: bool) -> RatingData:
    ratings = _require(directory, "bookcrossing", "BX-Book-Ratings.csv")
    books = _require(directory, "bookcrossing", "BX-Books.csv")
    rating_columns = [
        _Column("user", 0, ("userid", "user")),
        _Column("item", 1, ("isbn",)),
        _Column("rating", 2, ("bookrating", "rating")),
    ]
    rows = _table(ratings, _split_bx, rating_columns, what="';'-separated fields")
    keep = (lambda r: True) if keep_implicit else (lambda r: r != 0)
    interactions = _ratings_rows(ratings, rows, False, keep)
    title_columns = [_Column("id", 0, ("isbn",)), _Column("title", 1, ("booktitle", "title"))]
    titles = _titles(books, _table(books, _split_bx, title_columns, what="';'-separated fields"), _clean_bx_title)
    return RatingData(
        name=directory.name,
        format="bookcrossing",
        interactions=interactions,
        item_titles=_with_placeholders(titles, interactions),
        scale=RatingScale(0.0 if keep_implicit else 1.0, 10.0, 5.0, "points"),
        has_timestamps=False,
        item_noun="book",
        source=directory,
    )


def _load_lastfm(directory: Path) -> RatingData:
    plays = _require(directory, "lastfm", "user_artists.dat")
    artists = _require(directory, "lastfm", "artists.dat")
    columns = [
        _Column("user", 0, ("userid",)),
        _Column("item", 1, ("artistid",)),
        _Column("rating", 2, ("weight", "playcount")),
    ]
    rows = _table(plays, _split_on("\t"), columns, what="tab-separated fields")
    interactions = _ratings_rows(plays, rows, False, lambda r: True)
    title_columns = [_Column("id", 0, ("id", "artistid")), _Column("title", 1, ("name",))]
    title_rows = _table(artists, _split_on("\t"), title_columns, what="tab-separated fields")
    titles = _titles(artists, title_rows, html.unescape)
    low, high = _observed_range(interactions)
    return RatingData(
        name=directory.name,
        format="lastfm",
        interactions=interactions,
        item_titles=_with_placeholders(titles, interactions),
        scale=RatingScale(low, high, None, "plays"),
        has_timestamps=False,
        item_noun="artist",
        source=directory,
    )


_MARKERS: Mapping[str, tuple[str, ...]] = {
    "movielens": ("u.data", "ratings.csv", "ratings.dat"),
    "bookcrossing": ("BX-Book-Ratings.csv",),
    "lastfm": ("user_artists.dat",),
}


def detect_format(directory: str | Path) -> str:
    """The format of a data directory, from its file names (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("not a directory", directory)
    found = [fmt for fmt, names in _MARKERS.items() if _find(directory, *names) is not None]
    if any(p.suffix.lower() == ".inter" for p in directory.iterdir() if p.is_file()):
        found.insert(0, "recbole")
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"ambiguous rating data: looks like {' and '.join(found)}; pass format=", directory)
    present = ", ".join(sorted(p.name for p in directory.iterdir())[:10]) or "nothing"
    raise InputError(
        "cannot detect the rating format (expected <name>.inter, u.data, ratings.csv, ratings.dat, "
        f"BX-Book-Ratings.csv or user_artists.dat; found {present})",
        directory,
    )


def load_ratings(path: str | Path, format: str | None = None, *, keep_implicit: bool = False) -> RatingData:
    """Load a rating data set from a directory (or from its ratings file, e.g. a RecBole ``.inter``).

    ``format``: one of ``recbole``, ``movielens``, ``bookcrossing``, ``lastfm``; detected when None.
    ``keep_implicit``: BookCrossing only — keep the rating-0 (implicit) rows, which then count as disliked.
    Raises ``InputError`` naming the file and line for missing files, short rows and non-numeric values.
    """
    path = Path(path)
    inter: Path | None = None
    if path.is_file():
        if path.suffix.lower() == ".inter":
            inter = path
            format = format or "recbole"
        path = path.parent
    if not path.is_dir():
        raise InputError("no such directory", path)
    fmt = (format or detect_format(path)).lower()
    with bulk_allocation():
        if fmt == "recbole":
            return _load_recbole(path, inter)
        if fmt == "movielens":
            return _load_movielens(path)
        if fmt == "bookcrossing":
            return _load_bookcrossing(path, keep_implicit)
        if fmt == "lastfm":
            return _load_lastfm(path)
    raise InputError(f"unknown rating format {format!r} (expected one of: {', '.join(FORMATS)})", path)
