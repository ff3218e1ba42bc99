"""Readers, vocabulary, sequences, k-core and the leave-one-out split, on tiny hand-made data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data.sequences import (
    DataError,
    Interactions,
    SequenceData,
    Vocabulary,
    build_sequences,
    leave_one_out,
    load_dataset,
    pad_prefixes,
    read_interactions,
)

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def inter_of(rows: list[tuple[str, str, float]]) -> Interactions:
    users, items, times = zip(*rows, strict=True)
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object), np.array(times))


# ---------------------------------------------------------------------------------------------- readers


def test_read_inter_strips_field_types_and_keeps_file_order(tmp_path):
    path = write_text(tmp_path / "x.inter", INTER_HEADER + "u1\t10\t4\t5\nu2\t007\t3\t1.5\nu1\t11\t5\t2\n")
    inter = read_interactions(path)
    assert inter.users.tolist() == ["u1", "u2", "u1"]
    assert inter.items.tolist() == ["10", "007", "11"]  # ids stay strings: no int parsing, no lost zeros
    assert inter.timestamps.dtype == np.float64
    assert inter.timestamps.tolist() == [5.0, 1.5, 2.0]


def test_read_csv_with_configured_column_names(tmp_path):
    path = write_text(tmp_path / "x.csv", "ts,who,what,extra\n3,a,x,1\n1,b,y,2\n")
    inter = read_interactions(path, user_col="who", item_col="what", time_col="ts")
    assert inter.users.tolist() == ["a", "b"]
    assert inter.items.tolist() == ["x", "y"]
    assert inter.timestamps.tolist() == [3.0, 1.0]


def test_read_parquet_turns_numeric_ids_into_strings_and_datetimes_into_seconds(tmp_path):
    frame = pd.DataFrame(
        {
            "uid": [1, 2],
            "iid": ["a", "b"],
            "when": pd.to_datetime(["1970-01-01 00:00:10", "1970-01-02 00:00:00"]),
        }
    )
    frame.to_parquet(tmp_path / "x.parquet")
    inter = read_interactions(tmp_path / "x.parquet", user_col="uid", item_col="iid", time_col="when")
    assert inter.users.tolist() == ["1", "2"]
    assert inter.timestamps.tolist() == [10.0, 86400.0]


def test_explicit_format_overrides_suffix_and_no_time_column_means_file_order(tmp_path):
    path = write_text(tmp_path / "x.txt", "user_id,item_id\na,x\na,y\n")
    inter = read_interactions(path, fmt="csv", time_col=None)
    assert inter.timestamps.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "expected"),
    [
        ("absent.inter", None, {}, "data file not found"),
        ("x.json", "{}", {}, "cannot tell the format"),
        ("x.inter", "", {}, "empty file"),
        ("x.inter", INTER_HEADER, {}, "no interactions"),
        ("x.inter", INTER_HEADER + "u\ti\t1\t1\n", {"item_col": "movie_id"}, "missing column 'movie_id'"),
        ("x.inter", INTER_HEADER + "u\ti\t1\t1\nu\ti\t1\t1\textra\n", {}, "not a readable inter file"),
        ("x.inter", INTER_HEADER + "u\ti\t1\t1\nu\ti\t1\tyesterday\n", {}, "line 3 has 'yesterday'"),
        ("x.inter", INTER_HEADER + "u\ti\t1\t1\n\tj\t1\t2\n", {}, "column 'user_id' has 1 empty id"),
        ("x.csv", "user_id,item_id,timestamp\nu,i,1\nu,i\n", {}, "column 'timestamp'"),
        (
            "x.inter",
            "user_id:token\tuser_id:float\titem_id:token\ttimestamp:float\nu\t1\ti\t1\n",
            {},
            "column 'user_id' appears twice",
        ),
        ("x.parquet", "not parquet at all", {}, "not a readable parquet file"),
        ("x.inter", INTER_HEADER + "u\ti\t1\t1\n", {"fmt": "xlsx"}, "unknown data format"),
    ],
)
def test_bad_input_raises_one_clear_data_error(tmp_path, name, content, kwargs, expected):
    path = tmp_path / name
    if content is not None:
        write_text(path, content)
    with pytest.raises(DataError, match=expected) as info:
        read_interactions(path, **kwargs)
    if kwargs.get("fmt") != "xlsx":
        assert str(path) in str(info.value)  # the message names the file
    assert "\n" not in str(info.value)


def test_interactions_rejects_columns_of_different_length():
    with pytest.raises(ValueError, match="differ in length"):
        Interactions(np.array(["a"], dtype=object), np.array(["x", "y"], dtype=object), np.zeros(1))


# ------------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_ids_follow_first_seen_order_and_pad_is_zero():
    vocab = Vocabulary.build(["b", "a", "b", "c"])
    assert vocab.tokens == ["b", "a", "c"]
    assert len(vocab) == 4  # includes PAD
    assert vocab.encode(["a", "c", "b", Vocabulary.PAD]).tolist() == [2, 3, 1, 0]
    assert vocab.decode([0, 1, 2, 3]) == [Vocabulary.PAD, "b", "a", "c"]
    assert vocab.decode(np.array([[3, 1]])) == ["c", "b"]
    assert vocab.lookup("c") == 3
    assert vocab.lookup("zzz") is None
    assert vocab.encode([]).dtype == np.int64


def test_vocabulary_unknown_tokens_are_reported_or_dropped():
    vocab = Vocabulary(["x", "y"])
    with pytest.raises(DataError, match=r"2 of 4 token\(s\) not in the vocabulary .*'new'.*'other'"):
        vocab.encode(["x", "new", "other", "y"])
    assert vocab.encode(["x", "new", "other", "y"], unknown="drop").tolist() == [1, 2]
    assert vocab.ids(["new", "y"]).tolist() == [-1, 2]
    with pytest.raises(ValueError, match="unknown must be"):
        vocab.encode(["x"], unknown="ignore")
    with pytest.raises(TypeError, match="lookup"):
        vocab.encode("x")
    with pytest.raises(DataError, match="outside the vocabulary"):
        vocab.decode([3])


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["a", "a"], "duplicate token: 'a'"),
        (["a", "[PAD]"], "reserved padding"),
        (["a", 3], "must all be str"),
    ],
)
def test_vocabulary_rejects_bad_tokens(tokens, expected):
    with pytest.raises(DataError, match=expected):
        Vocabulary(tokens)


def test_vocabulary_save_load_round_trip_is_atomic(tmp_path):
    vocab = Vocabulary(["é", "b c", "1"])
    path = tmp_path / "sub" / "items.json"
    vocab.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["items.json"]  # no temp file left behind
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.encode(["1", "é"]).tolist() == [3, 1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        ("{nope", "not a readable vocabulary"),
        ('{"toks": []}', "'tokens' list"),
        ('{"tokens": ["a", "a"]}', "duplicate token"),
    ],
)
def test_vocabulary_load_bad_file(tmp_path, content, expected):
    path = tmp_path / "v.json"
    if content is not None:
        write_text(path, content)
    with pytest.raises(DataError, match=expected):
        Vocabulary.load(path)


# -------------------------------------------------------------------------------------------- sequences


def test_build_sequences_orders_by_time_with_ties_in_file_order():
    inter = inter_of(
        [
            ("u2", "c", 5.0),
            ("u1", "b", 9.0),
            ("u1", "a", 1.0),
            ("u1", "z", 9.0),  # same time as "b", later in the file: comes after it
            ("u2", "a", 5.0),
            ("u1", "y", 9.0),
        ]
    )
    data = build_sequences(inter)
    assert data.users == ["u2", "u1"]  # first-seen order
    assert data.item_vocab.tokens == ["c", "b", "a", "z", "y"]
    decoded = [data.item_vocab.decode(s) for s in data.sequences]
    assert decoded == [["c", "a"], ["a", "b", "z", "y"]]
    assert (data.n_users, data.n_items, data.n_interactions) == (2, 5, 6)
    assert data.lengths.tolist() == [2, 4]
    assert np.array_equal(np.concatenate(data.sequences), data.flat)


def test_build_sequences_with_given_vocabulary_drops_or_rejects_unknown_items(caplog):
    vocab = Vocabulary(["a", "b", "c"])
    inter = inter_of([("u", "c", 1), ("u", "new", 2), ("u", "a", 3), ("v", "new", 1)])
    data = build_sequences(inter, item_vocab=vocab)
    assert data.item_vocab is vocab
    assert data.users == ["u"]
    assert data.sequences[0].tolist() == [3, 1]
    assert "dropped 2 interactions" in caplog.text
    with pytest.raises(DataError, match="'new'"):
        build_sequences(inter, item_vocab=vocab, unknown="error")
    with pytest.raises(DataError, match="no interactions left"):
        build_sequences(inter_of([("u", "new", 1)]), item_vocab=vocab)


def test_sequence_data_computes_flat_and_offsets_and_checks_ids():
    vocab = Vocabulary(["a", "b"])
    data = SequenceData(["u", "v"], [np.array([1, 2]), np.array([2])], vocab)
    assert data.flat.tolist() == [1, 2, 2]
    assert data.offsets.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"1\.\.2"):
        SequenceData(["u"], [np.array([3])], vocab)


def naive_k_core(rows: list[tuple[str, str, float]], k: int) -> list[tuple[str, str, float]]:
    while True:
        users = pd.Series([r[0] for r in rows]).value_counts()
        items = pd.Series([r[1] for r in rows]).value_counts()
        kept = [r for r in rows if users.get(r[0], 0) >= k and items.get(r[1], 0) >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def test_k_core_is_iterative():
    # u3 has one interaction -> removed; then item "c" has 1 -> removed; then u2 has 1 -> removed.
    rows = [
        ("u1", "a", 1),
        ("u1", "b", 2),
        ("u2", "a", 3),
        ("u2", "c", 4),
        ("u3", "c", 5),
        ("u4", "a", 6),
        ("u4", "b", 7),
    ]
    data = build_sequences(inter_of(rows), k_core=2)
    assert data.users == ["u1", "u4"]
    assert data.item_vocab.tokens == ["a", "b"]
    with pytest.raises(DataError, match=r"no interactions left .*k_core=5"):
        build_sequences(inter_of(rows), k_core=5)


def test_k_core_matches_naive_filter_on_random_data():
    rng = np.random.default_rng(3)
    rows = [(f"u{u}", f"i{i}", float(t)) for t, (u, i) in enumerate(rng.integers(0, 30, size=(400, 2)))]
    for k in (2, 5, 9):
        expected = naive_k_core(rows, k)
        data = build_sequences(inter_of(rows), k_core=k)
        got = sorted(
            (u, tok)
            for u, seq in zip(data.users, data.sequences, strict=True)
            for tok in data.item_vocab.decode(seq)
        )
        assert got == sorted((u, i) for u, i, _ in expected)


def test_empty_interactions_raise():
    with pytest.raises(DataError, match="no interactions"):
        build_sequences(Interactions(np.array([], dtype=object), np.array([], dtype=object), np.array([])))


# --------------------------------------------------------------------------------------------- splitting


def make_data(lengths: list[int], n_items: int = 20, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    vocab = Vocabulary([f"i{k}" for k in range(n_items)])
    sequences = [rng.integers(1, n_items + 1, size=n).astype(np.int64) for n in lengths]
    return SequenceData([f"u{k}" for k in range(len(lengths))], sequences, vocab)


def test_leave_one_out_counts_and_positions():
    data = make_data([1, 2, 3, 4, 7])
    split = leave_one_out(data)
    pairs = list(zip(split.train_users.tolist(), split.train_positions.tolist(), strict=True))
    # n=1: nothing; n=2: position 1 (never evaluated); n=3: none; n=4: 1; n=7: 1..4.
    assert pairs == [(1, 1), (3, 1), (4, 1), (4, 2), (4, 3), (4, 4)]
    assert split.valid_users.tolist() == [2, 3, 4]
    assert split.valid_positions.tolist() == [1, 2, 5]
    assert split.test_users.tolist() == [2, 3, 4]
    assert split.test_positions.tolist() == [2, 3, 6]
    for arr in vars(split).values():
        assert arr.dtype == np.int64


def test_no_training_example_touches_validation_or_test_positions():
    data = make_data([3, 5, 8, 20, 2, 1, 13], seed=1)
    split = leave_one_out(data)
    n = data.lengths
    held_out = {u: n[u] - 2 for u in split.valid_users.tolist()}  # first held-out position per user
    for u, t in zip(split.train_users.tolist(), split.train_positions.tolist(), strict=True):
        if u in held_out:
            assert t < held_out[u]  # target before validation; input seq[:t] even more so
    # Validation input ends right before the validation target; test input includes it.
    assert np.array_equal(split.valid_positions + 1, split.test_positions)


def test_split_decides_tied_validation_and_test_by_file_order():
    # The last two events share a timestamp: the one later in the file is the test target.
    inter = inter_of([("u", "a", 1), ("u", "b", 2), ("u", "first", 3), ("u", "second", 3)])
    data = build_sequences(inter)
    split = leave_one_out(data)
    seq = data.sequences[0]
    assert data.item_vocab.decode([seq[split.valid_positions[0]]]) == ["first"]
    assert data.item_vocab.decode([seq[split.test_positions[0]]]) == ["second"]


def naive_pad(sequences, users, positions, max_len):
    out = np.zeros((len(users), max_len), dtype=np.int64)
    lengths = np.zeros(len(users), dtype=np.int64)
    for j, (u, t) in enumerate(zip(users, positions, strict=True)):
        prefix = sequences[u][max(0, t - max_len) : t]
        out[j, : len(prefix)] = prefix
        lengths[j] = len(prefix)
    return out, lengths


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_pad_prefixes_matches_naive(max_len):
    data = make_data([1, 2, 5, 9, 60, 4], seed=2)
    split = leave_one_out(data)
    users = np.concatenate([split.train_users, split.valid_users, split.test_users, [0, 4, 4]])
    positions = np.concatenate(
        [split.train_positions, split.valid_positions, split.test_positions, [1, 60, 0]]
    )
    got, got_len = pad_prefixes(data, users, positions, max_len)
    want, want_len = naive_pad(data.sequences, users, positions, max_len)
    assert got.dtype == np.int64
    assert got.shape == (len(users), max_len)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_len, want_len)
    # A plain list of sequences works too.
    np.testing.assert_array_equal(pad_prefixes(data.sequences, users, positions, max_len)[0], want)


def test_pad_prefixes_truncates_to_the_most_recent_items():
    data = SequenceData(["u"], [np.arange(1, 8)], Vocabulary([str(k) for k in range(7)]))
    prefixes, lengths = pad_prefixes(data, np.array([0, 0]), np.array([6, 2]), 4)
    assert prefixes.tolist() == [[3, 4, 5, 6], [1, 2, 0, 0]]
    assert lengths.tolist() == [4, 2]


def test_pad_prefixes_rejects_bad_arguments():
    data = make_data([3])
    with pytest.raises(ValueError, match=r"position 4 outside 0\.\.3"):
        pad_prefixes(data, np.array([0]), np.array([4]), 5)
    with pytest.raises(ValueError, match="user rows"):
        pad_prefixes(data, np.array([1]), np.array([1]), 5)
    with pytest.raises(ValueError, match="max_len"):
        pad_prefixes(data, np.array([0]), np.array([1]), 0)


def test_load_dataset_reads_and_builds(tmp_path):
    rows = "".join(f"u{k % 3}\ti{k % 4}\t1\t{k}\n" for k in range(24))
    path = write_text(tmp_path / "x.inter", INTER_HEADER + rows)
    data = load_dataset(path, k_core=2)
    assert (data.n_users, data.n_items, data.n_interactions) == (3, 4, 24)
    assert data.users == ["u0", "u1", "u2"]


def test_vocabulary_short_and_long_lookups_agree() -> None:
    vocab = Vocabulary([f"i{n}" for n in range(500)])
    rng = np.random.default_rng(0)
    tokens = [f"i{n}" for n in rng.integers(0, 700, size=200)] + [Vocabulary.PAD, "", "i499"]
    short = vocab.ids(tokens)  # a short list of str: the dict path
    long = vocab.ids(np.asarray(tokens, dtype=object))  # an array: the pandas path
    assert short.dtype == long.dtype == np.int64
    np.testing.assert_array_equal(short, long)
    assert (short == -1).sum() == sum(1 for t in tokens if t not in set(vocab.tokens) | {Vocabulary.PAD})
