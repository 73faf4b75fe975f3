import struct
import zlib

import pytest

from nic.container import (COLOUR_RGB, HEADER_SIZE, MAGIC, SUBSTREAM_ENTRY, FormatError, Header, Substream,
                           pack, pack_step, pack_substreams, parse_header, unpack, unpack_step)


def make_file(payload: bytes = bytes(range(32)), width: int = 33, height: int = 17) -> bytes:
    header = Header(model_id=1, quality=3, colour=COLOUR_RGB, width=width, height=height,
                    weights_hash=b"\x01\x02\x03\x04\x05\x06\x07\x08",
                    latent_shape=(192, -(-height // 16), -(-width // 16)), payload_length=len(payload))
    return pack(header, payload)


def section(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(kind + body))


def test_round_trip():
    data = make_file()
    parsed = unpack(data)
    assert parsed.header.width == 33 and parsed.header.height == 17
    assert parsed.header.latent_shape == (192, 2, 3)
    assert parsed.payload == bytes(range(32))
    assert data[:4] == MAGIC and len(data) == HEADER_SIZE + 32 + 4


@pytest.mark.parametrize("cut", range(0, HEADER_SIZE + 36))
def test_truncation_at_every_offset_is_a_format_error(cut):
    data = make_file()
    with pytest.raises(FormatError):
        unpack(data[:cut])


def test_every_single_bit_flip_is_detected():
    data = make_file()
    for position in range(len(data)):
        for bit in range(8):
            corrupted = bytearray(data)
            corrupted[position] ^= 1 << bit
            with pytest.raises(FormatError):
                unpack(bytes(corrupted))


def test_messages_name_the_problem():
    data = bytearray(make_file())
    with pytest.raises(FormatError, match="magic"):
        unpack(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(FormatError, match="empty"):
        unpack(b"")
    data[4] = 3
    with pytest.raises(FormatError, match="version 3"):
        unpack(bytes(data))
    good = make_file()
    with pytest.raises(FormatError, match="payload is corrupt"):
        unpack(good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])
    with pytest.raises(FormatError, match="truncated"):
        unpack(good[:-1])


def _with_header_fields(**changes) -> bytes:
    fields = dict(model_id=1, quality=3, colour=COLOUR_RGB, width=33, height=17, weights_hash=bytes(8),
                  latent_shape=(192, 2, 3), payload_length=4)
    fields.update(changes)
    return Header(**fields).pack() + bytes(8)


def test_absurd_dimensions_fail_before_reading_the_payload():
    data = _with_header_fields(width=100000, height=100000, latent_shape=(192, 6250, 6250))
    with pytest.raises(FormatError, match="exceeds the limit"):
        parse_header(data)
    with pytest.raises(FormatError, match="invalid dimensions"):
        parse_header(_with_header_fields(width=0, latent_shape=(192, 2, 0)))
    with pytest.raises(FormatError, match="latent shape"):
        parse_header(_with_header_fields(latent_shape=(192, 9, 9)))
    with pytest.raises(FormatError, match="implausible"):
        parse_header(_with_header_fields(payload_length=2**31))
    with pytest.raises(FormatError, match="colour"):
        parse_header(_with_header_fields(colour=9))


def test_pixel_limit_is_configurable():
    data = make_file()
    with pytest.raises(FormatError, match="limit"):
        unpack(data, max_pixels=100)
    assert unpack(data, max_pixels=33 * 17).header.width == 33


def test_unknown_ancillary_sections_are_skipped_and_critical_ones_refused():
    data = make_file()
    parsed = unpack(data + section(b"xTRA", b"hello"))
    assert parsed.sections == [(b"xTRA", b"hello")]
    with pytest.raises(FormatError, match="ICCP"):
        unpack(data + section(b"ICCP", b"profile"))
    with pytest.raises(FormatError, match="trailing"):
        unpack(data + b"\x00\x01")
    broken = bytearray(data + section(b"xTRA", b"hello"))
    broken[-6] ^= 0x40
    with pytest.raises(FormatError, match="section"):
        unpack(bytes(broken))


def test_the_step_section_is_a_known_critical_one_with_checked_fields():
    data = make_file()
    body = pack_step(363, 3)
    assert unpack(data + section(b"STEP", body)).sections == [(b"STEP", body)]
    assert unpack_step(body) == (363, 3)
    with pytest.raises(FormatError, match="appears twice"):
        unpack(data + section(b"STEP", body) + section(b"STEP", body))
    for bad, message in ((b"\x01", "has 1 bytes"), (pack_step(2000, 0), "out of range"),
                         (pack_step(256, 100), "out of range")):
        with pytest.raises(FormatError, match=message):
            unpack_step(bad)


def make_v2(substreams, width: int = 130, height: int = 100) -> bytes:
    payload = b"".join(bytes(p) for p in pack_substreams(substreams))
    header = Header(model_id=2, quality=3, colour=COLOUR_RGB, width=width, height=height,
                    weights_hash=bytes(8), latent_shape=(16, -(-height // 16), -(-width // 16)),
                    payload_length=len(payload), version=2)
    return pack(header, payload)


def test_version_2_payload_is_a_list_of_substreams():
    streams = [Substream(b"zhat", (8, 2, 3), bytes(range(8))), Substream(b"yhat", (16, 7, 9), bytes(12))]
    parsed = unpack(make_v2(streams))
    assert parsed.header.version == 2 and parsed.substreams() == streams
    # Version 1: the whole payload is one substream of the header's latent shape.
    v1 = unpack(make_file())
    assert v1.substreams() == [Substream(b"yhat", (192, 2, 3), bytes(range(32)))]


@pytest.mark.parametrize("entry, message", [
    (dict(shape=(8, 8, 3)), "does not fit a latent grid of 7x9"),
    (dict(shape=(0, 2, 3)), "claims shape 0x2x3"),
    (dict(name=b"z\x00\x01t"), "invalid name"),
    (dict(length=1 << 20), "more than the payload holds"),
    (dict(length=6), "claims 6 bytes"),
    (dict(reserved=1), "reserved field"),
])
def test_lying_substream_directories_are_refused(entry, message):
    name, shape, length = entry.get("name", b"zhat"), entry.get("shape", (8, 2, 3)), entry.get("length", 8)
    directory = struct.pack("<I", 1) + SUBSTREAM_ENTRY.pack(name, *shape, entry.get("reserved", 0), length)
    payload = directory + bytes(8)
    header = Header(model_id=2, quality=3, colour=COLOUR_RGB, width=130, height=100, weights_hash=bytes(8),
                    latent_shape=(16, 7, 9), payload_length=len(payload), version=2)
    with pytest.raises(FormatError, match=message):
        unpack(pack(header, payload)).substreams()


def test_substream_counts_and_leftovers_are_refused():
    base = dict(model_id=2, quality=3, colour=COLOUR_RGB, width=130, height=100, weights_hash=bytes(8),
                latent_shape=(16, 7, 9), version=2)
    for payload, message in ((struct.pack("<I", 0), "0 substreams"), (struct.pack("<I", 17), "17 substreams"),
                             (struct.pack("<I", 3) + bytes(16), "too short"),
                             (b"".join(bytes(p) for p in pack_substreams([Substream(b"zhat", (8, 2, 3), bytes(4))]))
                              + bytes(4), "4 bytes after its last substream")):
        with pytest.raises(FormatError, match=message):
            unpack(pack(Header(**base, payload_length=len(payload)), payload)).substreams()


@pytest.mark.parametrize("space,channels,kept", [(b"RGB ", 3, True), (b"GRAY", 1, True), (b"GRAY", 3, False),
                                                  (b"RGB ", 1, False), (b"CMYK", 3, False), (b"Lab ", 3, False)])
def test_a_profile_is_stored_only_where_it_describes_the_pixels(space, channels, kept):
    import nic
    from nic import api
    from nic.container import profile_for
    from conftest import icc_profile, smooth_image

    profile = icc_profile(b"test", space)
    assert profile_for(profile, channels) == (profile if kept else None)
    assert profile_for(b"short", channels) is None and profile_for(None, channels) is None
    stored = nic.decode(api.encode_pixels(smooth_image(16, 24, channels), 2, icc_profile=profile)).info
    assert stored.get("icc_profile") == (profile if kept else None)
