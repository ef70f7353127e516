import io
import tarfile

from helpers import add_member
from pipeline.io.tarshards import TarShardWriter, is_safe_key, iter_samples, split_name


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            add_member(t, name, data)
    return buf.getvalue()


def test_split_and_safe_keys():
    assert split_name("dir/abc.latent.npy") == ("dir/abc", "latent.npy")
    assert is_safe_key("000123") and is_safe_key("a/b_c")
    for bad in ("../x", "/abs", "a/../b", "a\\b", "", "a\x00b", "."):
        assert not is_safe_key(bad)


def test_grouping_duplicates_and_unsafe_keys():
    data = _tar(
        [("a.jpg", b"1"), ("a.txt", b"t"), ("b.jpg", b"2"), ("a.jpg", b"3"), ("../c.jpg", b"4"), ("b.jpg", b"5")]
    )
    got = [(s.key, s.error, sorted(s.fields)) for s in iter_samples(io.BytesIO(data))]
    assert got == [
        ("a", None, ["jpg", "txt"]),
        ("b", None, ["jpg"]),
        ("a", "duplicate_key", []),
        ("../c", "unsafe_key", []),
        ("b", "duplicate_key", []),
    ]


def test_corrupt_header_and_truncated_data_are_reported():
    data = bytearray(_tar([(f"k{i}.bin", b"x" * 700) for i in range(4)]))
    bad = bytearray(data)
    bad[2 * 1536 + 100 : 2 * 1536 + 108] = b"garbage!"  # third member's header
    got = [(s.key, s.error) for s in iter_samples(io.BytesIO(bytes(bad)))]
    # k1's end was never seen (a sample ends where the next key starts): it may be partial
    assert got == [("k0", None), ("k1", "corrupt_tar"), ("", "corrupt_tar")]
    truncated = bytes(data[: 1536 + 700])  # second member's data cut short
    got = [(s.key, s.error) for s in iter_samples(io.BytesIO(truncated))]
    assert got == [("k0", None), ("k1", "corrupt_tar"), ("", "corrupt_tar")]


def test_member_size_cap():
    data = _tar([("a.jpg", b"x" * 5000), ("b.jpg", b"y")])
    got = [(s.key, s.error) for s in iter_samples(io.BytesIO(data), max_member_bytes=1000)]
    assert got == [("a", "member_too_large"), ("b", None)]


def test_writer_is_deterministic():
    def build():
        buf = io.BytesIO()
        with TarShardWriter(buf) as w:
            w.write("k1", {"latent.npy": b"abc", "json": b"{}"})
            w.write("k2", {"latent.npy": b"def"})
        return buf.getvalue()

    assert build() == build()
    assert [s.key for s in iter_samples(io.BytesIO(build()))] == ["k1", "k2"]
