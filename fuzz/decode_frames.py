"""atheris harness for the daemon's frame decoder: any bytes either decode to a valid message
or raise ProtocolError, never anything else, and whatever decodes re-encodes and decodes back
to the same bytes.

    make fuzz                                        # 5 minutes
    python fuzz/decode_frames.py -max_total_time=20  # the short run the test suite does
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trackd.protocol import ProtocolError, decode, encode, frame_record, iter_records


def test_one_input(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolError:
        pass
    else:
        again = encode(message)
        assert encode(decode(again)) == again  # bytes, not messages: NaN != NaN
    records = list(iter_records(data))
    for end, payload in records:
        assert end <= len(data)
        assert [p for _, p in iter_records(frame_record(payload))] == [payload]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
