"""Randomly damaged release files: a load either succeeds or raises MovieLensFormatError that
names the damaged file and a line inside it -- never another exception, never a silent NaN."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from movielens_fixtures import write_csv_release, write_ml1m, write_ml100k

from vq_torchrec.datasets import MovieLensFormatError, load_movielens

RELEASES = {
    "ml-100k": (write_ml100k, ["u.data", "u.item", "u.user"]),
    "ml-1m": (write_ml1m, ["ratings.dat", "movies.dat", "users.dat"]),
    "ml-25m": (write_csv_release, ["ratings.csv", "movies.csv"]),
}
NASTY = [
    b"::",
    b"\t",
    b",",
    b"|",
    b"\n",
    b'"',
    b"\x00",
    b"\xe9",
    b"\xc3\xa9",
    b"-",
    b".",
    b"9" * 25,
    b"nan",
    b"",
]


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, int, str, int, bytes, int]:
    name = draw(st.sampled_from(sorted(RELEASES)))
    which = draw(st.integers(0, len(RELEASES[name][1]) - 1))
    kind = draw(st.sampled_from(["truncate", "insert", "replace", "delete"]))
    position = draw(st.integers(0, 10_000))
    payload = draw(st.sampled_from(NASTY) | st.binary(min_size=1, max_size=4))
    span = draw(st.integers(1, 12))
    return name, which, kind, position, payload, span


@settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=damage())
def test_damaged_file_loads_or_names_file_and_line(
    tmp_path_factory: pytest.TempPathFactory, case
) -> None:
    name, which, kind, position, payload, span = case
    writer, files = RELEASES[name]
    root = tmp_path_factory.mktemp("fuzz")
    writer(root)
    path = root / files[which]
    raw = path.read_bytes()
    at = position % (len(raw) + 1)
    if kind == "truncate":
        damaged = raw[:at]
    elif kind == "insert":
        damaged = raw[:at] + payload + raw[at:]
    elif kind == "replace":
        damaged = raw[:at] + payload + raw[at + span :]
    else:
        damaged = raw[:at] + raw[at + span :]
    path.write_bytes(damaged)
    try:
        data = load_movielens(name, root=root)
    except MovieLensFormatError as err:
        assert err.path == path, str(err)
        assert str(path) in str(err)
        if err.line is not None:
            assert 1 <= err.line <= damaged.count(b"\n") + 1, str(err)
        return
    # it loaded: then it must be clean data
    ratings = data.ratings
    assert ratings["user_id"].dtype == np.int64 and ratings["item_id"].dtype == np.int64
    assert np.isin(ratings["rating"].to_numpy(), np.arange(1, 11) / 2).all()
    assert (ratings["timestamp"].to_numpy() >= 0).all()
    assert data.items["item_id"].dtype == np.int64
    assert all(isinstance(g, list) for g in data.items["genres"])
