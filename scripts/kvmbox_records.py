"""The host side of the test guest's disk records (guest/testguest/records.c), shared by
scripts/crash-consistency.py and scripts/soak.py.

A record is 512 bytes of little-endian u64 words: MAGIC, its number n, its stream, 60 words of
record_word(stream, n, i) (i = 3..62), then the FNV-1a 64 hash of the first 504 bytes. Record n
lives in sector n.
"""

import struct

REC = 512
MAGIC = 0x31434552424D564B  # "KVMBREC1"
M64 = (1 << 64) - 1


def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def record_word(stream, n, i):
    """Payload word i of record n of `stream` (splitmix64), as in records.c."""
    z = (stream * 0x2545F4914F6CDD1D + n * 61 + i + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def check_record(data, n, stream):
    """None if `data` is record n of `stream` intact, else what is wrong with it."""
    if len(data) < REC:
        return "missing (image too short)"
    words = struct.unpack("<64Q", data[:REC])
    if words[0] != MAGIC:
        return "no record magic (never written or overwritten)"
    if words[1] != n:
        return f"holds record {words[1]}"
    if words[2] != stream:
        return f"holds stream {words[2]:#x}, not {stream:#x}"
    if fnv1a(data[: REC - 8]) != words[63]:
        return "checksum mismatch (torn or damaged)"
    for i in range(3, 63):
        if words[i] != record_word(stream, n, i):
            return f"payload word {i} wrong"
    return None


def check_records(data, count, stream, first=0):
    """None if `data` holds records first..first+count-1 of `stream` intact, else the first
    problem."""
    for k in range(count):
        bad = check_record(data[k * REC:(k + 1) * REC], first + k, stream)
        if bad:
            return f"record {first + k} of {first + count}: {bad}"
    return None
