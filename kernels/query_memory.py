"""Stateful detection of query-based black-box attacks: a bounded memory of recent queries' content
fingerprints (Blacklight; Li, Shan, Wenger, Zhang, Zheng & Zhao, USENIX Security 2022).

Query-based attacks (SquareAttack, HopSkipJump, BoundaryAttack) send hundreds of near-identical images.
Blacklight's observation: quantize a query's pixels, hash every window of ``window`` consecutive
pixels of the flattened image, keep the ``hashes`` largest hash values as the query's fingerprint, and
flag a query that shares at least ``threshold`` of them with one recent query. Two attack queries a small
step apart share most windows; two different natural images share few (the all-background window
counts once, being one value).

Here:

- the window hash is a polynomial of the quantized pixels mixed by a keyed SplitMix64 finalizer, its
  key drawn from the OS at start (an attacker does not know which windows a query keeps);
- the memory is a bucketed table of ``(tag, query number)`` entries, ``ways`` per bucket: inserting a
  hash replaces its bucket's oldest entry, and an entry older than ``capacity`` queries never matches,
  so memory is fixed at start (8 bytes per entry, ``2 * capacity * hashes`` entries) whatever the traffic;
- an exact repeat of a remembered query (the same pixels) is a policy choice, ``repeats``: ``"allow"``
  (default; a client re-sending an image learns nothing new) or ``"flag"``.

:class:`QueryMemory` is what both served models run per request, image by image in arrival order.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

import numpy as np

from kernels.errors import InvalidInputError

REPEAT_POLICIES = ("allow", "flag")
LOAD = 2  # table entries per remembered hash
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # SplitMix64's finalizer


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on a ``uint64`` array (wrapping, as NumPy's integer arrays do
    silently): a bijection that spreads every bit."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def _inverse(a: np.uint64) -> np.uint64:
    """The inverse of an odd ``a`` mod 2^64 (Newton's iteration, each step doubling the correct bits)."""
    a, x = int(a), int(a)
    for _ in range(6):
        x = x * (2 - a * x) % 2**64
    return np.uint64(x)


@dataclass(frozen=True)
class QueryMemoryConfig:
    """Knobs of :class:`QueryMemory` (written into the served models' configs by the repository writer).

    Attributes:
        capacity: queries remembered; older ones never match.
        window: consecutive pixels (of the flattened image, channels first) per hashed window.
        quantization: pixel step on the 0-255 scale; pixels in one step hash alike (Blacklight's 50).
        hashes: largest window hashes kept per query (its fingerprint).
        threshold: shared hashes with one remembered query that flag a query.
        repeats: an exact repeat of a remembered query: ``"allow"`` or ``"flag"``.
        ways: entries per bucket of the table.
    """

    capacity: int = 100_000
    window: int = 50
    quantization: int = 50
    hashes: int = 50
    threshold: int = 25
    repeats: str = "allow"
    ways: int = 8

    def __post_init__(self) -> None:
        for name in ("capacity", "window", "quantization", "hashes", "threshold", "ways"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"query memory: {name} must be at least 1, got {getattr(self, name)}")
        if self.capacity >= 1 << 30:
            raise InvalidInputError(f"query memory: capacity must be below 2^30 queries, got {self.capacity}")
        if self.threshold > self.hashes:
            raise InvalidInputError(f"query memory: threshold {self.threshold} exceeds the {self.hashes} hashes kept")
        if self.repeats not in REPEAT_POLICIES:
            raise InvalidInputError(f"query memory: repeats must be one of {', '.join(REPEAT_POLICIES)}, "
                                    f"got {self.repeats!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_strings(cls, knobs: dict[str, str]) -> "QueryMemoryConfig":
        """From text values (a served model's config parameters), each knob checked."""
        unknown = sorted(set(knobs) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(f"query memory: unknown knob(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**{k: v if k == "repeats" else int(v) for k, v in knobs.items()})
        except ValueError as e:
            raise InvalidInputError(f"query memory: {e}") from None


class QueryMemory:
    """The last ``capacity`` queries' fingerprints and the match test (module docstring).

    Args:
        config: the knobs.
        key: the 64-bit hash key; default fresh from the OS (give one only to reproduce a measurement).
    """

    def __init__(self, config: QueryMemoryConfig = QueryMemoryConfig(), key: int | None = None) -> None:
        self.config = c = config
        key = int.from_bytes(os.urandom(8), "little") if key is None else key
        self._key = np.uint64(key & (2**64 - 1))
        self._base = _mix(np.array([self._key ^ np.uint64(0x9E3779B97F4A7C15)]))[0] | np.uint64(1)  # odd
        # twice the entries the remembered queries hold: at this load a full bucket (whose oldest entry is
        # then replaced) is rare, so a query keeps nearly all its hashes until it is `capacity` queries old
        self.buckets = -(-LOAD * c.capacity * c.hashes // c.ways)
        self._tags = np.zeros((self.buckets, c.ways), np.uint32)
        # the query number (mod 2^32) that wrote each entry; ages are differences mod 2^32, so numbers may
        # wrap; a never-written entry starts 2^31 queries old (dead, and the first to be replaced)
        self._seqs = np.full((self.buckets, c.ways), 1 << 31, np.uint32)
        self._digests = np.zeros(c.capacity, np.uint64)  # of each remembered query's exact pixels
        self._powers = self._inverse_powers = None  # of the hash base, per image size (fingerprints)
        self.seen = 0  # queries so far

    @property
    def nbytes(self) -> int:
        """Memory of the table and the digests, fixed at start."""
        return self._tags.nbytes + self._seqs.nbytes + self._digests.nbytes

    def fingerprints(self, images: np.ndarray) -> np.ndarray:
        """``(B, hashes) uint64``: the largest distinct keyed window hashes of each image of ``images``
        (``(B, ...)`` in [0, 1]), padded with 0 (never a match) where an image has fewer distinct windows.

        Every window's polynomial ``sum_j q[i + j] * base^(window - 1 - j)`` (mod 2^64) comes from one
        prefix sum: ``base`` is odd, hence invertible mod 2^64, so a window is a difference of prefix
        sums times a power of ``base``'s inverse."""
        c = self.config
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        n = x.shape[1]
        if n < c.window:
            raise InvalidInputError(f"query memory: images of {n} values are shorter than a window of {c.window}")
        if self._powers is None or len(self._powers) != n:
            self._powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, self._base)], dtype=np.uint64)
            self._inverse_powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, _inverse(self._base))],
                                              dtype=np.uint64)
        q = np.floor(np.clip(x, 0.0, 1.0) * 255.0 / c.quantization).astype(np.uint64)
        prefix = np.zeros((len(q), n + 1), np.uint64)
        np.cumsum(q * self._powers[::-1], axis=1, dtype=np.uint64, out=prefix[:, 1:])
        # sum_{t<k} q[t] base^(n-1-t): window i is (prefix[i+w] - prefix[i]) / base^(n-i-w)
        windows = (prefix[:, c.window:] - prefix[:, :-c.window]) * self._inverse_powers[:n - c.window + 1][::-1]
        h = np.sort(_mix(windows ^ self._key), axis=1)
        h[:, 1:][h[:, 1:] == h[:, :-1]] = 0  # keep one of each value
        top = np.sort(h, axis=1)[:, ::-1][:, :c.hashes]
        if top.shape[1] < c.hashes:
            top = np.pad(top, ((0, 0), (0, c.hashes - top.shape[1])))
        return np.ascontiguousarray(top)

    def digest(self, images: np.ndarray) -> np.ndarray:
        """``(B,) uint64``: a keyed BLAKE2b of each image's exact float32 values (what ``repeats`` compares)."""
        x = np.ascontiguousarray(np.asarray(images, np.float32).reshape(len(images), -1))
        key = int(self._key).to_bytes(8, "little")
        return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little")
                         for row in x], np.uint64)

    def observe(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match each image against the memory (and the images before it in ``images``), then remember it.

        Returns ``(flagged (B,) bool, matches (B,) int)``: ``matches`` is the most hashes the image
        shares with one remembered query; flagged when it reaches ``threshold`` (an exact repeat of that
        query is not flagged under ``repeats="allow"``)."""
        c = self.config
        fps, digests = self.fingerprints(images), self.digest(images)
        flagged, matches = np.zeros(len(fps), bool), np.zeros(len(fps), np.int64)
        buckets = np.uint64(self.buckets)
        for i, (fp, digest) in enumerate(zip(fps, digests)):
            fp = fp[fp != 0]
            bucket, tag = (fp % buckets).astype(np.int64), (fp >> np.uint64(32)).astype(np.uint32)
            age = np.uint32(self.seen & 0xFFFFFFFF) - self._seqs[bucket]  # wraps mod 2^32; 0: the last query
            live = (self._tags[bucket] == tag[:, None]) & (age < c.capacity)
            if live.any():
                ages, counts = np.unique(age[live], return_counts=True)
                best = int(np.argmax(counts))
                matches[i] = counts[best]
                repeat = self._digests[(self.seen - 1 - int(ages[best])) % c.capacity] == digest
                flagged[i] = counts[best] >= c.threshold and not (repeat and c.repeats == "allow")
            self.seen += 1
            number = np.uint32(self.seen & 0xFFFFFFFF)
            _, once = np.unique(bucket, return_index=True)
            ways = np.argmax(age[once], axis=1)  # each bucket's oldest entry
            self._tags[bucket[once], ways], self._seqs[bucket[once], ways] = tag[once], number
            for j in np.setdiff1d(np.arange(len(bucket)), once):  # a second hash of this query in one bucket
                way = np.argmax(number - self._seqs[bucket[j]])
                self._tags[bucket[j], way], self._seqs[bucket[j], way] = tag[j], number
            self._digests[(self.seen - 1) % c.capacity] = digest
        return flagged, matches


def calibrated(config: QueryMemoryConfig, images: np.ndarray, rate: float = 0.001, seed: int = 0
               ) -> tuple[QueryMemoryConfig, dict]:
    """``config`` with the smallest ``threshold`` that flags at most ``rate`` of a benign stream: ``images``
    (distinct clean images) sent in a seeded random order to an empty memory; and what was measured
    (queries, rate, realized share, the most matches seen). The share grows with the traffic a memory
    has seen (more chances of a look-alike), so measure it again on a stream as long as the capacity."""
    if not 0 < rate < 1:
        raise InvalidInputError(f"query memory: the benign flag rate must lie in (0, 1), got {rate}")
    order = np.random.default_rng(seed).permutation(len(images))
    _, matches = QueryMemory(config, key=seed).observe(np.asarray(images)[order])
    shares = [(matches >= t).mean() for t in range(1, config.hashes + 1)]
    threshold = next((t for t, share in zip(range(1, config.hashes + 1), shares) if share <= rate), config.hashes)
    return (QueryMemoryConfig(**{**config.to_json(), "threshold": threshold}),
            {"queries": len(images), "rate": rate, "realized": float(shares[threshold - 1]),
             "max_matches": int(matches.max(initial=0)), "seed": seed})
